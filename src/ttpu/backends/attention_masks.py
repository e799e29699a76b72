"""Shape helper shared by the backends' attention kernels (jax arrays and torch tensors
alike: both index and reshape the same way)."""

from __future__ import annotations

from typing import TypeVar

Array = TypeVar("Array")


def mask_for_groups(mask: Array, kv_heads: int) -> Array:
    """A [batch, 1|heads, q, kv] mask (or one with fewer leading axes) shaped to broadcast
    against grouped-query scores [batch, kv_heads, groups, q, kv]."""
    while mask.ndim < 4:
        mask = mask[None]
    if mask.shape[1] == 1:
        return mask[:, :, None]
    return mask.reshape(mask.shape[0], kv_heads, -1, *mask.shape[2:])
