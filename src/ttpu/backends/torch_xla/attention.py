"""The "ttpu_xla" attention implementation for the torch_xla backend.

Registered with transformers through ``AttentionInterface`` and, with it, a mask function
in ``AttentionMaskInterface`` that always materialises the boolean mask (causality,
padding, sliding windows, chunks), so one kernel serves every model that supports the
interface, Gemma 2's logit soft-capping and GPT-OSS's attention sinks included.

Kernels, chosen per call from static facts (platform, shapes, options):
- on TPU, queries of at least one Pallas block (``flash_attention`` pads to it) without
  soft-capping or sinks: torch_xla's Pallas flash attention, the mask passed as an
  additive bias (so padding, sliding windows and static-cache prefills all work);
- otherwise (decode steps, CPU and GPU, soft-capping, sinks): dot-product attention in
  torch ops that XLA fuses, scores and softmax in float32, GQA without copying KV heads.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

from ttpu.backends.attention_masks import mask_for_groups, materialised_mask, restricted_to_indices

ATTENTION_NAME = "ttpu_xla"
# Queries shorter than one flash block (a decode step) are not worth the kernel's padding.
FLASH_MIN_QUERY = 128
MASK_MIN = torch.finfo(torch.float32).min


def kernel_for(platform: str, query_length: int, softcap: float | None, sinks: torch.Tensor | None) -> str:
    """"flash" (Pallas, TPU only) or "xla" (fused torch ops) for one attention call."""
    if platform == "tpu" and query_length >= FLASH_MIN_QUERY and softcap is None and sinks is None:
        return "flash"
    return "xla"


def describe(platform: str) -> str:
    """What ``ttpu doctor`` says about attention on ``platform``."""
    if platform == "tpu":
        return (
            f"{ATTENTION_NAME}: Pallas flash attention for queries of >= {FLASH_MIN_QUERY} tokens "
            "without soft-capping or sinks; fused XLA attention otherwise (decode steps)"
        )
    return f"{ATTENTION_NAME}: fused XLA attention (the Pallas flash kernel runs on TPU only; this is {platform})"


def dot_product_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float,
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention over [batch, heads, seq, dim]; ``key``/``value`` may have fewer heads
    (GQA). ``mask``: boolean (True = attend) or additive, broadcastable to
    [batch, heads, q, kv]. Returns [batch, q, heads, dim], as transformers expects."""
    batch, heads, length, dim = query.shape
    kv_heads = key.shape[1]
    grouped = query.reshape(batch, kv_heads, heads // kv_heads, length, dim)
    scores = torch.einsum("bhgqd,bhkd->bhgqk", grouped.float(), key.float()) * scale
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if mask is not None:
        mask = mask_for_groups(mask, kv_heads)
        if mask.dtype == torch.bool:
            scores = scores.masked_fill(~mask, MASK_MIN)
        else:  # clamped: a fully masked (padding) row stays finite, never NaN
            scores = torch.clamp(scores + mask.float(), min=MASK_MIN)
    if sinks is not None:
        sink = sinks.float().reshape(1, kv_heads, -1, 1, 1).expand(*scores.shape[:-1], 1)
        probs = torch.softmax(torch.cat([scores, sink], dim=-1), dim=-1)[..., :-1]
    else:
        probs = torch.softmax(scores, dim=-1)
    out = torch.einsum("bhgqk,bhkd->bhgqd", probs.to(value.dtype), value)
    return out.reshape(batch, heads, length, value.shape[-1]).transpose(1, 2)


def flash(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None, scale: float) -> torch.Tensor:
    """torch_xla's Pallas flash attention (TPU); returns [batch, q, heads, dim]."""
    from torch_xla.experimental.custom_kernel import flash_attention

    groups = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    bias = None
    if mask is not None:
        if mask.dtype == torch.bool:
            mask = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device).masked_fill(~mask, MASK_MIN)
        bias = mask.float().expand(query.shape[0], query.shape[1], query.shape[2], key.shape[2])
    return flash_attention(query, key, value, causal=False, sm_scale=scale, ab=bias).transpose(1, 2)


def xla_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    softcap: float | None = None,
    s_aux: torch.Tensor | None = None,
    indices: torch.Tensor | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers attention function (see ``AttentionInterface``) for torch_xla;
    ``indices`` (DeepSeek's DSA) restrict each query to those key positions."""
    if dropout and module.training:
        raise NotImplementedError(
            "attention dropout during training is not supported by ttpu's torch_xla attention; "
            "set the model's attention dropout to 0."
        )
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    if indices is not None:
        attention_mask = restricted_to_indices(attention_mask, indices, key.shape[2])
    if kernel_for(_platform(query), query.shape[2], softcap, s_aux) == "flash":
        return flash(query, key, value, attention_mask, scale), None
    return dot_product_attention(query, key, value, attention_mask, scale, softcap, s_aux), None


def _platform(tensor: torch.Tensor) -> str:
    if tensor.device.type != "xla":
        return tensor.device.type
    import torch_xla.runtime as xr

    return xr.device_type().lower()


def register_attention() -> None:
    """Register the "ttpu_xla" attention and mask implementations with transformers."""
    AttentionInterface.register(ATTENTION_NAME, xla_attention_forward)
    AttentionMaskInterface.register(ATTENTION_NAME, materialised_mask)
