"""Attention masks as both backends' attention implementations take them: the mask
function registered with transformers, and the mask's shape for grouped-query scores
(jax arrays and torch tensors alike: both index and reshape the same way)."""

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


def materialised_mask(*args: Any, **kwargs: Any) -> torch.Tensor | None:
    """transformers' boolean [batch, 1, q, kv] mask (``AttentionMaskInterface``), always
    built: never skipped for "causal only" or "nothing padded" inputs, since the
    attention implementations need causality, padding and windows in it, and the check
    behind the skip reads mask values (a host round trip that splits lazy graphs)."""
    kwargs["allow_is_causal_skip"] = False
    kwargs["allow_is_bidirectional_skip"] = False
    return sdpa_mask(*args, **kwargs)
