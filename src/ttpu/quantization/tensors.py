"""The quantizers and the dequantizer: plain tensor functions, no modules."""

from __future__ import annotations

import torch

from ttpu.errors import InvalidArgumentError

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
    return pack_int4(q.reshape(weight.shape).to(torch.uint8)), scale, low


def pack_int4(values: torch.Tensor) -> torch.Tensor:
    """``[rows, in]`` values 0..15 as uint8 ``[rows, in / 2]``, element ``2i`` in the low nibble."""
    return values[:, 0::2] | (values[:, 1::2] << 4)


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
    check_groups_divide(inputs, group_size)
    return weight.detach().float().reshape(out, inputs // group_size, group_size)


def check_groups_divide(inputs: int, group_size: int, name: str = "") -> None:
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



def _divisor_near(n: int, target: int) -> int:
    divisors = [d for d in range(2, n + 1, 2) if n % d == 0] or [n]
    return min(divisors, key=lambda d: abs(d - target))
