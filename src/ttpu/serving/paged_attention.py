"""Attention over a paged KV cache: the XLA implementation (gather by block table), the
default on CPU and GPU.

The pool of one layer holds ``slots = num_blocks * block_size`` key and value rows
([slots, kv_heads, head_dim]); slot ``block * block_size + offset`` holds position
``index_in_table * block_size + offset`` of the request whose block table lists ``block``.
A step runs a flat, ragged batch of tokens from several requests (decodes, prompt chunks,
both): each token's new key and value are written at its slot, then each token attends to
its request's positions up to its own (and within the sliding window, if any).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from ttpu.backends.jax.attention import dot_product_attention


class PagedBatch(NamedTuple):
    """Where the tokens of one step sit, as padded arrays (padding tokens write into the
    null block's slots and attend to nothing real; their outputs are ignored)."""

    positions: jax.Array  # [tokens] each token's position in its sequence
    slots: jax.Array  # [tokens] the pool slot its key and value go to
    rows: jax.Array  # [tokens] the request (row of block_tables) it belongs to
    block_tables: jax.Array  # [requests, blocks per request] block ids, padded with 0 (the null block)


def write_kv(pool: jax.Array, new: jax.Array, slots: jax.Array) -> jax.Array:
    """``pool`` [slots, kv_heads, dim] with ``new`` [tokens, kv_heads, dim] written at ``slots``."""
    return pool.at[slots].set(new.astype(pool.dtype), mode="drop")


def paged_attention(
    query: jax.Array,
    key_pool: jax.Array,
    value_pool: jax.Array,
    batch: PagedBatch,
    *,
    block_size: int,
    scale: float,
    sliding_window: int | None = None,
    softcap: float | None = None,
    sinks: jax.Array | None = None,
) -> jax.Array:
    """Each token's attention [tokens, q_heads, dim] over its request's cached positions
    ``<=`` its own (and ``> position - sliding_window``). The pools already hold this
    step's keys and values (:func:`write_kv`)."""
    offsets = jnp.arange(block_size)
    # [requests, context] the slot of every position of every request's table
    context_slots = (batch.block_tables[:, :, None] * block_size + offsets).reshape(batch.block_tables.shape[0], -1)
    token_slots = context_slots[batch.rows]  # [tokens, context]
    keys = jnp.moveaxis(key_pool[token_slots], 2, 1)  # [tokens, kv_heads, context, dim]
    values = jnp.moveaxis(value_pool[token_slots], 2, 1)
    context = jnp.arange(token_slots.shape[1])
    allowed = context[None, :] <= batch.positions[:, None]
    if sliding_window is not None:
        allowed &= context[None, :] > batch.positions[:, None] - sliding_window
    out = dot_product_attention(
        query[:, :, None, :], keys, values, allowed[:, None, None, :], scale=scale, softcap=softcap, sinks=sinks
    )  # [tokens, 1, q_heads, dim]
    return out[:, 0]
