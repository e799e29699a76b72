"""Attention masks as both backends' attention implementations take them: the mask
function registered with transformers, a mask restricted to a sparse-attention
indexer's chosen keys, and the mask's shape for grouped-query scores (jax arrays and
torch tensors alike: both index and reshape the same way)."""

from __future__ import annotations

from typing import Any, TypeVar

import torch
from transformers.masking_utils import sdpa_mask

Array = TypeVar("Array")


def mask_for_groups(mask: Array, kv_heads: int) -> Array:
    """A [batch, 1|heads, q, kv] mask (or one with fewer leading axes) shaped to broadcast
    against grouped-query scores [batch, kv_heads, groups, q, kv]."""
    while mask.ndim < 4:
        mask = mask[None]
    if mask.shape[1] == 1:
        return mask[:, :, None]
    return mask.reshape(mask.shape[0], kv_heads, -1, *mask.shape[2:])


def restricted_to_indices(mask: torch.Tensor | None, indices: torch.Tensor, kv_len: int) -> torch.Tensor:
    """``mask`` ([batch, 1|heads, q, kv], boolean or additive; None: all visible) where
    each query also sees only the key positions ``indices`` [batch, q, k] names: a
    sparse-attention indexer's top-k, as DeepSeek's DSA hands it to attention functions
    other than eager and SDPA (which apply it to the mask themselves). -1 names none.
    Torch operations, so both backends run the same ones (torchax lowers them)."""
    picked = torch.where(indices >= 0, indices, kv_len).long()  # -1: a column past the keys, dropped below
    allowed = torch.zeros((*indices.shape[:-1], kv_len + 1), dtype=torch.bool, device=indices.device)
    allowed = allowed.scatter(-1, picked, True)[..., :kv_len][:, None]
    if mask is None:
        return allowed
    if mask.dtype == torch.bool:
        return mask & allowed
    return mask.masked_fill(~allowed, torch.finfo(mask.dtype).min)


def materialised_mask(*args: Any, **kwargs: Any) -> torch.Tensor | None:
    """transformers' boolean [batch, 1, q, kv] mask (``AttentionMaskInterface``), always
    built: never skipped for "causal only" or "nothing padded" inputs, since the
    attention implementations need causality, padding and windows in it, and the check
    behind the skip reads mask values (a host round trip that splits lazy graphs)."""
    kwargs["allow_is_causal_skip"] = False
    kwargs["allow_is_bidirectional_skip"] = False
    return sdpa_mask(*args, **kwargs)
