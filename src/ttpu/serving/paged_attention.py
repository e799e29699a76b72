"""Attention over a paged KV cache, behind one interface with two kernels: the XLA one
(gather by block table), the default on CPU and GPU, and jax's Pallas
``ragged_paged_attention`` on TPU.

One layer's pool is ``[num_blocks, block_size, 2 * kv_heads, head_dim]``, the Pallas
kernel's layout: a key head at each even index, its value head at the odd one after it.
Block ``b``'s row ``o`` holds position ``index_in_table * block_size + o`` of the request
whose block table lists ``b`` at ``index_in_table``; slot ``b * block_size + o`` names it.
A step runs a flat, ragged batch of tokens from several requests (decodes, prompt chunks,
both), each request's tokens contiguous and in order, padding last: each token's new key
and value are written at its slot, then each token attends to its request's positions up
to its own (and within the sliding window, if any).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

from ttpu.backends.jax.attention import dot_product_attention


class PagedBatch(NamedTuple):
    """Where the tokens of one step sit, as padded arrays (padding tokens write into the
    null block's slots and attend to nothing real; their outputs are ignored)."""

    positions: jax.Array  # [tokens] each token's position in its sequence (-1: padding)
    slots: jax.Array  # [tokens] the pool slot its key and value go to
    rows: jax.Array  # [tokens] the request (row of block_tables) it belongs to
    block_tables: jax.Array  # [requests, blocks per request] block ids, padded with 0 (the null block)


def write_kv(pool: jax.Array, keys: jax.Array, values: jax.Array, slots: jax.Array) -> jax.Array:
    """``pool`` with ``keys`` and ``values`` [tokens, kv_heads, dim] written at ``slots``."""
    blocks, block_size, heads, dim = pool.shape
    rows = jnp.stack([keys, values], axis=2).reshape(keys.shape[0], heads, dim).astype(pool.dtype)
    return pool.reshape(blocks * block_size, heads, dim).at[slots].set(rows, mode="drop").reshape(pool.shape)


def xla_paged_attention(
    query: jax.Array,
    pool: jax.Array,
    batch: PagedBatch,
    *,
    scale: float,
    sliding_window: int | None = None,
    softcap: float | None = None,
    sinks: jax.Array | None = None,
) -> jax.Array:
    """Each token's attention [tokens, q_heads, dim] over its request's cached positions
    ``<=`` its own (and ``> position - sliding_window``). The pool already holds this
    step's keys and values (:func:`write_kv`)."""
    blocks, block_size, heads, dim = pool.shape
    # [requests, context] the slot of every position of every request's table
    offsets = jnp.arange(block_size)
    context_slots = (batch.block_tables[:, :, None] * block_size + offsets).reshape(batch.block_tables.shape[0], -1)
    gathered = pool.reshape(blocks * block_size, heads, dim)[context_slots[batch.rows]]  # [tokens, context, 2h, dim]
    keys = jnp.moveaxis(gathered[:, :, 0::2], 2, 1)  # [tokens, kv_heads, context, dim]
    values = jnp.moveaxis(gathered[:, :, 1::2], 2, 1)
    context = jnp.arange(context_slots.shape[1])
    allowed = context[None, :] <= batch.positions[:, None]
    if sliding_window is not None:
        allowed &= context[None, :] > batch.positions[:, None] - sliding_window
    out = dot_product_attention(
        query[:, :, None, :], keys, values, allowed[:, None, None, :], scale=scale, softcap=softcap, sinks=sinks
    )  # [tokens, 1, q_heads, dim]
    return out[:, 0]


def pallas_paged_attention(
    query: jax.Array,
    pool: jax.Array,
    batch: PagedBatch,
    *,
    scale: float,
    sliding_window: int | None = None,
    softcap: float | None = None,
    num_kv_pages_per_block: int | None = None,
    num_queries_per_block: int | None = None,
) -> jax.Array:
    """The same attention through jax's Pallas ``ragged_paged_attention`` (TPU): the
    per-request query offsets and context lengths it takes come from ``batch``; block
    sizes default to jax's tuned ones for the TPU version."""
    from jax.experimental.pallas.ops.tpu.ragged_paged_attention import ragged_paged_attention

    return ragged_paged_attention(
        query, pool, *ragged_arguments(batch), sm_scale=scale, sliding_window=sliding_window, soft_cap=softcap,
        num_kv_pages_per_block=num_kv_pages_per_block, num_queries_per_block=num_queries_per_block,
    )


def ragged_arguments(batch: PagedBatch) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """``batch`` as jax's ragged paged attention takes it: each request's context length,
    its block table, where its queries start (and the end of the last) and how many
    requests there are."""
    requests = batch.block_tables.shape[0]
    real = batch.positions >= 0
    counts = jax.ops.segment_sum(real.astype(jnp.int32), batch.rows, requests)
    context_lens = jnp.maximum(jax.ops.segment_max(jnp.where(real, batch.positions + 1, 0), batch.rows, requests), 0)
    query_starts = jnp.concatenate([jnp.zeros(1, jnp.int32), jnp.cumsum(counts).astype(jnp.int32)])
    num_requests = jnp.sum(counts > 0, keepdims=True).astype(jnp.int32)
    return context_lens.astype(jnp.int32), batch.block_tables, query_starts, num_requests


@functools.cache
def _on_tpu() -> bool:
    return jax.default_backend() == "tpu"


def paged_attention_kernel(sinks: bool = False, sharded: bool = False) -> Callable[..., jax.Array]:
    """The kernel for this platform (both take the same arguments): Pallas on TPU, unless
    the layer has attention ``sinks``, which it does not take, or the pool is ``sharded``
    (GSPMD cannot split a Pallas call; that needs a shard_map over the heads); XLA elsewhere."""
    return pallas_paged_attention if _on_tpu() and not (sinks or sharded) else xla_paged_attention
