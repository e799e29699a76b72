"""Quantized torch modules and the swap that puts them into a model.

Both modules store ``weight`` (int8 ``[out, in]``, or int4 packed into uint8
``[out, in / 2]``) and ``weight_scale`` (float32: ``[out]`` for int8, ``[out, in /
group]`` for int4) as frozen parameters, under the names the float module had, so the
sharding rules engine and transformers' tensor-parallel plans split them as they split
the float weight. The forward dequantizes with plain torch ops (a convert and a multiply
next to the matmul), which each backend traces into its compiled program.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ttpu.errors import InvalidArgumentError
from ttpu.quantization.config import QuantizationConfig

INT8_MAX = 127
INT4_MAX = 7
INT4_OFFSET = 8  # stored nibble = value + 8, in [1, 15]


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8: ``weight ≈ q * scale[:, None]``; error ≤ scale / 2.
    An all-zero row gets scale 1 (its values are 0)."""
    weight = weight.detach().float()
    peak = weight.abs().amax(dim=1)
    scale = torch.where(peak > 0, peak / INT8_MAX, torch.ones_like(peak))
    q = torch.clamp(torch.round(weight / scale[:, None]), -INT8_MAX, INT8_MAX).to(torch.int8)
    return q, scale


def quantize_int4(weight: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int4 in groups of ``group_size`` input values, two per byte (element
    ``2i`` in the low nibble): ``weight ≈ (nibble - 8) * scale``; error ≤ scale / 2."""
    out, inputs = weight.shape
    if inputs % group_size:
        raise InvalidArgumentError(
            f"int4 groups of {group_size} do not divide the input dimension {inputs}; choose a group_size "
            f"that divides it (e.g. {_divisor_near(inputs, group_size)})."
        )
    groups = weight.detach().float().reshape(out, inputs // group_size, group_size)
    peak = groups.abs().amax(dim=2)
    scale = torch.where(peak > 0, peak / INT4_MAX, torch.ones_like(peak))
    q = torch.clamp(torch.round(groups / scale[..., None]), -INT4_MAX, INT4_MAX).to(torch.int16) + INT4_OFFSET
    q = q.reshape(out, inputs)
    packed = (q[:, 0::2] | (q[:, 1::2] << 4)).to(torch.uint8)
    return packed, scale


def dequantize(weight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The float ``[rows, in]`` weight of an int8 or packed-int4 ``weight`` (rows may be
    a gathered subset, e.g. embedding rows)."""
    if weight.dtype == torch.int8:
        return weight.to(dtype) * scale.to(dtype).unsqueeze(-1)
    low = (weight & 0xF).to(torch.int16)
    high = (weight >> 4).to(torch.int16)
    values = torch.stack([low, high], dim=-1).reshape(*weight.shape[:-1], weight.shape[-1] * 2) - INT4_OFFSET
    groups = scale.shape[-1]
    grouped = values.to(dtype).reshape(*values.shape[:-1], groups, values.shape[-1] // groups)
    return (grouped * scale.to(dtype).unsqueeze(-1)).reshape(values.shape)


class QuantizedLinear(torch.nn.Module):
    """``nn.Linear`` with an int8 or int4 weight (see the module docstring)."""

    def __init__(self, weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None,
                 in_features: int) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, weight.shape[0]
        self.weight, self.weight_scale = _frozen(weight), _frozen(weight_scale)
        self.bias = None if bias is None else torch.nn.Parameter(bias.detach(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight.dtype == torch.int8:  # the scale applies to the output: no float weight is scaled
            return _add_bias(F.linear(x, self.weight.to(x.dtype)) * self.weight_scale.to(x.dtype), self.bias)
        return F.linear(x, dequantize(self.weight, self.weight_scale, x.dtype), self.bias)

    def extra_repr(self) -> str:
        scheme = "int8" if self.weight.dtype == torch.int8 else "int4"
        return f"in_features={self.in_features}, out_features={self.out_features}, weights={scheme}"


class QuantizedEmbedding(torch.nn.Module):
    """``nn.Embedding`` with an int8 or int4 table: rows are gathered quantized and
    dequantized after the gather. ``embed_scale`` (Gemma's scaled embeddings) multiplies
    the result, as the module it replaces did."""

    def __init__(self, weight: torch.Tensor, weight_scale: torch.Tensor, source: torch.nn.Embedding) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim = source.num_embeddings, source.embedding_dim
        self.padding_idx = source.padding_idx
        self.weight, self.weight_scale = _frozen(weight), _frozen(weight_scale)
        embed_scale = getattr(source, "embed_scale", None)
        self.register_buffer("embed_scale", None if embed_scale is None else embed_scale.detach().clone(),
                             persistent=False)
        self.dtype = source.weight.dtype

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        rows = dequantize(self.weight[input_ids], self.weight_scale[input_ids], self.dtype)
        return rows if self.embed_scale is None else rows * self.embed_scale.to(self.dtype)


@dataclass
class QuantizationReport:
    """What :func:`quantize_module` changed: module names and bytes before and after
    (every parameter of the model counted once)."""

    config: QuantizationConfig
    quantized: list[str] = field(default_factory=list)
    bytes_before: int = 0
    bytes_after: int = 0


def quantize_module(module: torch.nn.Module, config: QuantizationConfig) -> QuantizationReport:
    """Replace ``module``'s linear layers (and with ``config.embeddings`` its token
    embedding and a tied LM head) by quantized ones, one at a time: each float weight is
    released once its quantized copy exists."""
    report = QuantizationReport(config, bytes_before=_parameter_bytes(module))
    embeddings = module.get_input_embeddings() if hasattr(module, "get_input_embeddings") else None
    table = id(embeddings.weight) if isinstance(embeddings, torch.nn.Embedding) else None
    shared: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # float weight id -> its quantized copy
    if config.embeddings and isinstance(embeddings, torch.nn.Embedding):
        name = _name_of(module, embeddings)
        if not config.excludes(name):
            weight, scale = (_frozen(t) for t in _quantize(embeddings.weight, config, name))
            shared[id(embeddings.weight)] = (weight, scale)  # the same parameters for a tied head
            _replace(module, name, QuantizedEmbedding(weight, scale, embeddings))
            report.quantized.append(name)
    for name, child in list(module.named_modules()):
        if not isinstance(child, torch.nn.Linear) or config.excludes(name):
            continue
        if id(child.weight) in shared:  # a tied LM head: the embedding's stored table
            weight, scale = shared[id(child.weight)]
        elif id(child.weight) == table:  # tied to an embedding left in floating point
            continue
        else:
            weight, scale = _quantize(child.weight, config, name)
        _replace(module, name, QuantizedLinear(weight, scale, child.bias, child.in_features))
        report.quantized.append(name)
    if not report.quantized:
        raise InvalidArgumentError(
            f"{type(module).__name__} has no linear layers (torch.nn.Linear) or embedding to quantize"
            + (f" outside exclude={list(config.exclude)}" if config.exclude else "") + "."
        )
    report.bytes_after = _parameter_bytes(module)
    return report


def _quantize(weight: torch.Tensor, config: QuantizationConfig, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    if weight.dim() != 2:
        raise InvalidArgumentError(f"{name}: cannot quantize a weight of shape {tuple(weight.shape)} (2-D only).")
    if config.weights == "int8":
        return quantize_int8(weight)
    try:
        return quantize_int4(weight, config.group_size)
    except InvalidArgumentError as exc:
        raise InvalidArgumentError(f"{name}: {exc}") from None


def _frozen(tensor: torch.Tensor) -> torch.nn.Parameter:
    if isinstance(tensor, torch.nn.Parameter):
        return tensor
    return torch.nn.Parameter(tensor, requires_grad=False)


def _add_bias(x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return x if bias is None else x + bias.to(x.dtype)


def _name_of(module: torch.nn.Module, target: torch.nn.Module) -> str:
    return next(name for name, child in module.named_modules() if child is target)


def _replace(module: torch.nn.Module, name: str, new: torch.nn.Module) -> None:
    parent_name, _, attribute = name.rpartition(".")
    setattr(module.get_submodule(parent_name) if parent_name else module, attribute, new)


def _parameter_bytes(module: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def _divisor_near(n: int, target: int) -> int:
    divisors = [d for d in range(2, n + 1, 2) if n % d == 0] or [n]
    return min(divisors, key=lambda d: abs(d - target))
