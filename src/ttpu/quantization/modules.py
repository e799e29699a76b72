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

import torch
import torch.nn.functional as F

from ttpu.errors import InvalidArgumentError
from ttpu.quantization.config import DEFAULT_GROUP_SIZE, QuantizationConfig

INT8_MAX = 127
INT4_LEVELS = 15  # nibbles 0..15


def quantize_int8(weight: torch.Tensor, group_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8: ``weight ≈ q * scale`` with a scale per row (``[out]``) or, with
    ``group_size``, per group of input values (``[out, in / group_size]``); error ≤
    scale / 2. An all-zero row or group gets scale 1 (its values are 0)."""
    if group_size is None:
        q, scale = _symmetric(weight.detach().float()[:, None, :], INT8_MAX)
        return q.reshape(weight.shape).to(torch.int8), scale[:, 0]
    q, scale = _symmetric(_groups(weight, group_size), INT8_MAX)
    return q.reshape(weight.shape).to(torch.int8), scale


def quantize_int4(weight: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric int4 in groups of ``group_size`` input values, two per byte (element
    ``2i`` in the low nibble): ``weight ≈ nibble * scale + minimum``, the 16 levels
    spanning each group's range (as GGUF's K-quants and torchao's int4 do); error ≤
    scale / 2. Returns the packed nibbles, the scales and the minimums."""
    groups = _groups(weight, group_size)
    low, high = groups.amin(dim=2), groups.amax(dim=2)
    scale = torch.where(high > low, (high - low) / INT4_LEVELS, torch.ones_like(high))
    q = torch.clamp(torch.round((groups - low[..., None]) / scale[..., None]), 0, INT4_LEVELS)
    q = q.reshape(weight.shape).to(torch.int16)
    return (q[:, 0::2] | (q[:, 1::2] << 4)).to(torch.uint8), scale, low


def dequantize(
    weight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype, minimum: torch.Tensor | None = None
) -> torch.Tensor:
    """The float ``[rows, in]`` weight of an int8 or packed-int4 ``weight`` (rows may be
    a gathered subset, e.g. embedding rows) with one scale per row or per group (and,
    for int4, each group's minimum)."""
    if weight.dtype == torch.int8:
        values = weight
    else:
        low, high = (weight & 0xF).to(torch.int16), (weight >> 4).to(torch.int16)
        values = torch.stack([low, high], dim=-1).reshape(*weight.shape[:-1], weight.shape[-1] * 2)
    if scale.dim() < values.dim():  # one scale per row
        return values.to(dtype) * scale.to(dtype).unsqueeze(-1)
    groups = scale.shape[-1]
    grouped = values.to(dtype).reshape(*values.shape[:-1], groups, values.shape[-1] // groups)
    grouped = grouped * scale.to(dtype).unsqueeze(-1)
    if minimum is not None:
        grouped = grouped + minimum.to(dtype).unsqueeze(-1)
    return grouped.reshape(values.shape)


def _groups(weight: torch.Tensor, group_size: int) -> torch.Tensor:
    out, inputs = weight.shape
    _check_groups_divide(inputs, group_size)
    return weight.detach().float().reshape(out, inputs // group_size, group_size)


def _check_groups_divide(inputs: int, group_size: int, name: str = "") -> None:
    if inputs % group_size:
        raise InvalidArgumentError(
            f"{name + ': ' if name else ''}groups of {group_size} do not divide the input dimension {inputs}; "
            f"choose a group_size that divides it (e.g. {_divisor_near(inputs, group_size)})."
        )


def _symmetric(groups: torch.Tensor, limit: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Round-to-nearest ``[out, groups, size]`` values to ``[-limit, limit]`` with one
    absmax scale per group."""
    peak = groups.abs().amax(dim=2)
    scale = torch.where(peak > 0, peak / limit, torch.ones_like(peak))
    return torch.clamp(torch.round(groups / scale[..., None]), -limit, limit), scale


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
    """What :func:`quantize_module` changed: module names and bytes before and after
    (every parameter of the model counted once)."""

    config: QuantizationConfig
    quantized: list[str] = field(default_factory=list)
    bytes_before: int = 0
    bytes_after: int = 0


def quantize_module(module: torch.nn.Module, config: QuantizationConfig) -> QuantizationReport:
    """Replace ``module``'s linear layers (exactly ``nn.Linear``: subclasses such as MoE
    routers keep their own forward) and, with ``config.embeddings``, its token embedding
    and a tied LM head by quantized ones. Every layer is checked before any is replaced;
    then they are replaced one at a time, each float weight released with its layer."""
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
    for name in linears if not quantize_table else [n for n in linears if n not in tied_heads]:
        _check_shape(module.get_submodule(name).weight, config, name)
    names = _tables(module, table) if quantize_table else []
    for name in names:
        _check_embedding(module.get_submodule(name), config, name)
    del embedding
    if quantize_table:
        tensors = _quantize(module.get_submodule(names[0]).weight, config, names[0])
        for name in names:  # every embedding of the table (T5's shared one is also each stack's embed_tokens)
            _replace(module, name, QuantizedEmbedding(tensors, module.get_submodule(name)))
        report.quantized.extend(names)
    for name in linears:
        linear = module.get_submodule(name)
        if name in tied_heads:
            if not quantize_table:
                continue  # tied to an embedding left in floating point
            quantized = QuantizedLinear(tensors, linear.bias, linear.in_features)  # one stored table
        else:
            quantized = QuantizedLinear(_quantize(linear.weight, config, name), linear.bias, linear.in_features)
        del linear
        _replace(module, name, quantized)
        report.quantized.append(name)
    if not report.quantized:
        raise InvalidArgumentError(
            f"{type(module).__name__} has no linear layers (torch.nn.Linear) or embedding to quantize"
            + (f" outside exclude={list(config.exclude)}" if config.exclude else "") + "."
        )
    report.bytes_after = _parameter_bytes(module)
    return report


def _input_embedding(module: torch.nn.Module) -> torch.nn.Embedding | None:
    try:
        embedding = module.get_input_embeddings()
    except (NotImplementedError, AttributeError):  # composite models (CLIP, ...) have none
        return None
    return embedding if isinstance(embedding, torch.nn.Embedding) else None


def _check_embedding(embedding: torch.nn.Embedding, config: QuantizationConfig, name: str) -> None:
    """A plain lookup table, or one whose forward only multiplies by ``embed_scale``
    (Gemma, BART, ...): other subclasses (normed embeddings, ...) would lose their forward."""
    if type(embedding) is not torch.nn.Embedding and not hasattr(embedding, "embed_scale"):
        raise InvalidArgumentError(
            f"{name} is a {type(embedding).__name__}, whose forward does more than a table lookup; ttpu quantizes "
            "plain embeddings only. Pass QuantizationConfig(..., embeddings=False)."
        )
    _check_shape(embedding.weight, config, name)


def _check_shape(weight: torch.Tensor, config: QuantizationConfig, name: str) -> None:
    if weight.dim() != 2:
        raise InvalidArgumentError(f"{name}: cannot quantize a weight of shape {tuple(weight.shape)} (2-D only).")
    size = config.group_size or (DEFAULT_GROUP_SIZE if config.weights == "int4" else None)
    if size is not None:
        _check_groups_divide(weight.shape[1], size, name)


def _tables(module: torch.nn.Module, table: int) -> list[str]:
    """Names of the embedding modules whose weight is the tensor with id ``table``."""
    return [name for name, child in module.named_modules(remove_duplicate=False)
            if isinstance(child, torch.nn.Embedding) and id(child.weight) == table]


def _quantize(weight: torch.Tensor, config: QuantizationConfig, name: str) -> QuantizedTensors:
    _check_shape(weight, config, name)
    if config.weights == "int8":
        return QuantizedTensors(*map(_frozen, quantize_int8(weight, config.group_size)))
    return QuantizedTensors(*map(_frozen, quantize_int4(weight, config.group_size or DEFAULT_GROUP_SIZE)))


def _frozen(tensor: torch.Tensor) -> torch.nn.Parameter:
    return torch.nn.Parameter(tensor, requires_grad=False)


def _add_bias(x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return x if bias is None else x + bias.to(x.dtype)


def _replace(module: torch.nn.Module, name: str, new: torch.nn.Module) -> None:
    parent_name, _, attribute = name.rpartition(".")
    setattr(module.get_submodule(parent_name) if parent_name else module, attribute, new)


def _parameter_bytes(module: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def _divisor_near(n: int, target: int) -> int:
    divisors = [d for d in range(2, n + 1, 2) if n % d == 0] or [n]
    return min(divisors, key=lambda d: abs(d - target))
