"""Quantized torch modules and the swap that puts them into a model.

Both modules store ``weight`` (int8 ``[out, in]``, or int4 packed into uint8
``[out, in / 2]``), ``weight_scale`` (float32: ``[out]`` for int8 per channel,
``[out, in / group]`` with groups) and for int4 ``weight_minimum`` (``[out, in /
group]``) as frozen parameters, under the names the float module had, so the
sharding rules engine and transformers' tensor-parallel plans split them as they split
the float weight. The forward dequantizes with plain torch ops (a convert and a multiply
next to the matmul), which each backend traces into its compiled program.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F

from ttpu.errors import InvalidArgumentError
from ttpu.quantization.config import DEFAULT_GROUP_SIZE, QuantizationConfig
from ttpu.quantization.gguf import DECODERS, FLOAT_TYPES, GgufCheckpoint
from ttpu.quantization.tensors import check_groups_divide, dequantize, quantize_int4, quantize_int8


class QuantizedLinear(torch.nn.Module):
    """``nn.Linear`` with an int8 or int4 weight (see the module docstring)."""

    def __init__(self, tensors: QuantizedTensors, bias: torch.Tensor | None, in_features: int) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, tensors.weight.shape[0]
        self.weight, self.weight_scale = tensors.weight, tensors.scale
        self.weight_minimum = tensors.minimum
        self.bias = None if bias is None else torch.nn.Parameter(bias.detach(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight_scale.dim() == 1:  # int8 per channel: the scale applies to the output
            return _add_bias(F.linear(x, self.weight.to(x.dtype)) * self.weight_scale.to(x.dtype), self.bias)
        return F.linear(x, dequantize(self.weight, self.weight_scale, x.dtype, self.weight_minimum), self.bias)

    def extra_repr(self) -> str:
        scheme = "int8" if self.weight.dtype == torch.int8 else "int4"
        return f"in_features={self.in_features}, out_features={self.out_features}, weights={scheme}"


class QuantizedEmbedding(torch.nn.Module):
    """``nn.Embedding`` with an int8 or int4 table: rows are gathered quantized and
    dequantized after the gather. ``embed_scale`` (Gemma's scaled embeddings) multiplies
    the result, as the module it replaces did."""

    def __init__(self, tensors: QuantizedTensors, source: torch.nn.Embedding) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim = source.num_embeddings, source.embedding_dim
        self.weight, self.weight_scale, self.weight_minimum = tensors.weight, tensors.scale, tensors.minimum
        embed_scale = getattr(source, "embed_scale", None)  # a tensor (Gemma) or a float (BART, ...)
        self.register_buffer("embed_scale", None if embed_scale is None else torch.as_tensor(embed_scale).clone(),
                             persistent=False)
        self.dtype = source.weight.dtype

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        minimum = None if self.weight_minimum is None else self.weight_minimum[input_ids]
        rows = dequantize(self.weight[input_ids], self.weight_scale[input_ids], self.dtype, minimum)
        return rows if self.embed_scale is None else rows * self.embed_scale.to(self.dtype)


@dataclass(frozen=True)
class QuantizedTensors:
    """One quantized weight as frozen parameters: the values, their scales and (int4)
    each group's minimum. Modules sharing a table (a tied LM head) share these."""

    weight: torch.nn.Parameter
    scale: torch.nn.Parameter
    minimum: torch.nn.Parameter | None = None


@dataclass
class QuantizationReport:
    """What :func:`quantize_module` changed: each quantized module's name and how it is
    stored (e.g. "int8 per channel", "int4 g32 (GGUF Q4_K)"), and the bytes before and
    after (every parameter of the model counted once)."""

    config: QuantizationConfig
    quantized: dict[str, str] = field(default_factory=dict)
    bytes_before: int = 0
    bytes_after: int = 0


def quantize_module(
    module: torch.nn.Module, config: QuantizationConfig, gguf: str | Path | None = None
) -> QuantizationReport:
    """Replace ``module``'s linear layers (exactly ``nn.Linear``: subclasses such as MoE
    routers keep their own forward) and, with ``config.embeddings``, its token embedding
    and a tied LM head by quantized ones. Every layer is checked before any is replaced;
    then they are replaced one at a time, each float weight released with its layer.

    ``gguf``: the GGUF file the weights were loaded from. Unless ``config.group_size`` is
    given (then every layer is quantized at that size), weights whose block format maps
    exactly onto the scheme are kept as stored instead of re-quantized (Q8_0 as int8 in
    groups of 32, ...: :mod:`ttpu.quantization.gguf`); the scheme "gguf" keeps every
    block format as the representation that holds it exactly and leaves float tensors
    float."""
    checkpoint = _gguf_checkpoint(module, config, gguf)
    report = QuantizationReport(config, bytes_before=_parameter_bytes(module))
    embedding = _input_embedding(module)
    table = id(embedding.weight) if embedding is not None else None
    quantize_table = embedding is not None and config.embeddings and not config.excludes(_tables(module, table)[0])
    linears = [name for name, child in module.named_modules()
               if type(child) is torch.nn.Linear and not config.excludes(name)]
    tied_heads = {name for name in linears if id(module.get_submodule(name).weight) == table}
    excluded_heads = [name for name, child in module.named_modules()
                      if type(child) is torch.nn.Linear and config.excludes(name) and id(child.weight) == table]
    if quantize_table and excluded_heads:
        raise InvalidArgumentError(
            f"{excluded_heads[0]} shares its weight with the token embedding (tied): quantize both (leave it out "
            "of exclude) or neither (embeddings=False)."
        )
    names = _tables(module, table) if quantize_table else []
    for name in names:
        _check_embedding(module.get_submodule(name), name)
    del embedding
    plans = {name: _plan(module.get_submodule(name).weight, config, name, checkpoint)
             for name in names[:1] + [n for n in linears if n not in tied_heads]}
    if names and plans[names[0]] is not None:
        tensors = _quantize(module.get_submodule(names[0]).weight, config, names[0], plans[names[0]], checkpoint)
        for name in names:  # every embedding of the table (T5's shared one is also each stack's embed_tokens)
            _replace(module, name, QuantizedEmbedding(tensors, module.get_submodule(name)))
            report.quantized[name] = plans[names[0]].representation
        for name in tied_heads:
            linear = module.get_submodule(name)
            _replace(module, name, QuantizedLinear(tensors, linear.bias, linear.in_features))  # one stored table
            report.quantized[name] = plans[names[0]].representation
    for name in linears:
        if name in tied_heads or plans[name] is None:
            continue  # tied to the table (replaced with it, or left float with it), or kept float from the GGUF
        linear = module.get_submodule(name)
        tensors = _quantize(linear.weight, config, name, plans[name], checkpoint)
        quantized = QuantizedLinear(tensors, linear.bias, linear.in_features)
        del linear, tensors
        _replace(module, name, quantized)
        report.quantized[name] = plans[name].representation
    if not report.quantized and checkpoint is not None and config.weights == "gguf":
        raise InvalidArgumentError(
            f"{checkpoint.path.name} holds none of {type(module).__name__}'s layers in a block format ttpu keeps "
            f"({', '.join(DECODERS['gguf'])}); choose int8 or int4 to quantize the loaded weights."
        )
    if not report.quantized:
        raise InvalidArgumentError(
            f"{type(module).__name__} has no linear layers (torch.nn.Linear) or embedding to quantize"
            + (f" outside exclude={list(config.exclude)}" if config.exclude else "") + "."
        )
    report.bytes_after = _parameter_bytes(module)
    return report


def _gguf_checkpoint(module: torch.nn.Module, config: QuantizationConfig, gguf: str | Path | None) -> GgufCheckpoint | None:
    if gguf is not None:
        return GgufCheckpoint(gguf, module, config.weights)
    if config.weights == "gguf":
        raise InvalidArgumentError(
            "quantization='gguf' keeps the blocks of the GGUF file the model was loaded from: load one with "
            "from_pretrained(..., gguf_file=...) (or the offline 'gemma-3-270m'), or choose int8 or int4."
        )
    return None


class _Plan(NamedTuple):
    """How one weight will be stored, and whether from the GGUF's own blocks."""

    representation: str
    from_gguf: bool = False


def _plan(weight: torch.Tensor, config: QuantizationConfig, name: str, checkpoint: GgufCheckpoint | None) -> _Plan | None:
    """How module ``name``'s weight will be stored, or None when it stays float (the
    "gguf" scheme, for a tensor the file holds in float). Raises for a weight that
    cannot be quantized as configured."""
    weight_name = f"{name}.weight"
    if checkpoint is not None and config.group_size is None and checkpoint.keeps(weight_name):
        if checkpoint.matches(weight_name, weight):
            return _Plan(checkpoint.representation(weight_name), from_gguf=True)
        if config.weights == "gguf":
            raise InvalidArgumentError(
                f"{weight_name}: the GGUF tensor ({checkpoint.format(weight_name)}) in {checkpoint.path.name} does "
                "not dequantize to the weight transformers loaded (its GGUF loader transforms this tensor), so it "
                "cannot be kept; pass quantization='int8' or 'int4' to quantize the loaded weights instead."
            )
    elif config.weights == "gguf":
        kind = checkpoint.format(weight_name)
        if kind is None or kind in FLOAT_TYPES:
            return None
        raise InvalidArgumentError(
            f"{name}: GGUF {kind} blocks have no exact form in ttpu (kept as they are: "
            f"{', '.join(DECODERS['gguf'])}); pass quantization='int8' or 'int4' to quantize the loaded weights."
        )
    _check_shape(weight, config, name)
    if config.weights == "int8" and config.group_size is None:
        return _Plan("int8 per channel")
    return _Plan(f"{config.weights} g{config.group_size or DEFAULT_GROUP_SIZE}")


def _input_embedding(module: torch.nn.Module) -> torch.nn.Embedding | None:
    try:
        embedding = module.get_input_embeddings()
    except (NotImplementedError, AttributeError):  # composite models (CLIP, ...) have none
        return None
    return embedding if isinstance(embedding, torch.nn.Embedding) else None


def _check_embedding(embedding: torch.nn.Embedding, name: str) -> None:
    """A plain lookup table, or one whose forward only multiplies by ``embed_scale``
    (Gemma, BART, ...): other subclasses (normed embeddings, ...) would lose their forward."""
    if type(embedding) is not torch.nn.Embedding and not hasattr(embedding, "embed_scale"):
        raise InvalidArgumentError(
            f"{name} is a {type(embedding).__name__}, whose forward does more than a table lookup; ttpu quantizes "
            "plain embeddings only. Pass QuantizationConfig(..., embeddings=False)."
        )


def _check_shape(weight: torch.Tensor, config: QuantizationConfig, name: str) -> None:
    if weight.dim() != 2:
        raise InvalidArgumentError(f"{name}: cannot quantize a weight of shape {tuple(weight.shape)} (2-D only).")
    size = config.group_size or (DEFAULT_GROUP_SIZE if config.weights == "int4" else None)
    if size is not None:
        check_groups_divide(weight.shape[1], size, name)


def _tables(module: torch.nn.Module, table: int) -> list[str]:
    """Names of the embedding modules whose weight is the tensor with id ``table``."""
    return [name for name, child in module.named_modules(remove_duplicate=False)
            if isinstance(child, torch.nn.Embedding) and id(child.weight) == table]


def _quantize(
    weight: torch.Tensor, config: QuantizationConfig, name: str, plan: _Plan, checkpoint: GgufCheckpoint | None
) -> QuantizedTensors:
    if plan.from_gguf:
        tensors = checkpoint.decode(f"{name}.weight")  # planned: its shape is the weight's
    elif config.weights == "int8":
        tensors = quantize_int8(weight, config.group_size)
    else:
        tensors = quantize_int4(weight, config.group_size or DEFAULT_GROUP_SIZE)
    return QuantizedTensors(*(_frozen(t) for t in tensors if t is not None))


def _frozen(tensor: torch.Tensor) -> torch.nn.Parameter:
    return torch.nn.Parameter(tensor, requires_grad=False)


def _add_bias(x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return x if bias is None else x + bias.to(x.dtype)


def _replace(module: torch.nn.Module, name: str, new: torch.nn.Module) -> None:
    parent_name, _, attribute = name.rpartition(".")
    setattr(module.get_submodule(parent_name) if parent_name else module, attribute, new)


def _parameter_bytes(module: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())
