"""Attention over a paged KV cache, behind one interface with two kernels: the XLA one
(gather by block table), the default on CPU and GPU, and jax's Pallas
``ragged_paged_attention`` on TPU; and a sparse one for the steps whose attention a
sparse-attention indexer limits to each token's top-k positions (any platform).

One layer's pool is ``[num_blocks, block_size, 2 * kv_heads, head_dim]``, the Pallas
kernel's layout: a key head at each even index, its value head at the odd one after it.
Block ``b``'s row ``o`` holds position ``index_in_table * block_size + o`` of the request
whose block table lists ``b`` at ``index_in_table``; slot ``b * block_size + o`` names it.
A step runs a flat, ragged batch of tokens from several requests (decodes, prompt chunks,
both), each request's tokens contiguous and in order, padding last: each token's new key
and value are written at its slot, then each token attends to its request's positions up
to its own (and within the sliding window, if any). A step of whole new prompts may
instead be rows of equal width, one prompt per row with its padding in place
(``new_rows``): each row attends within itself.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec as P

from ttpu.errors import InvalidArgumentError
from ttpu.sharding.rules import Axis



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
    return pool.at[slots // block_size, slots % block_size].set(rows, mode="promise_in_bounds")


PER_HEAD_OPTIONS = ("sinks", "alibi_slopes")  # kernel options holding a value per query head
PER_TOKEN_OPTIONS = ("indices",)  # kernel options holding values per token (split as the tokens are)
CONTEXT_CHUNK = 128  # cached positions the XLA kernel gathers per query block per loop iteration
MAX_QUERY_BLOCK = 16  # queries of one request that share one read of its context
QUERY_BLOCK_GROUP = 8  # query blocks whose contexts one turn of the context loop reads
Carry = tuple[jax.Array, jax.Array, jax.Array]  # online softmax: running max, sum of exp, weighted values


class QueryBlocks(NamedTuple):
    """Some of a step's tokens cut into blocks of ``width`` consecutive tokens of one
    request each (a request's last block padded), so that a block's queries read its
    request's cached keys and values with one gather each and one matrix product each."""

    tokens: jax.Array  # [blocks, width] the token in each query slot (clipped into range)
    real: jax.Array  # [blocks, width] whether the slot holds a real token of the block's request
    requests: jax.Array  # [blocks] each block's request
    slot_of_token: jax.Array  # [tokens] each token's query slot (block * width + offset; any slot for tokens left out)


def query_blocks(batch: PagedBatch, width: int, chosen: jax.Array | None = None) -> QueryBlocks:
    """The ``chosen`` tokens (default: the real ones; a request's are all chosen or none)
    of ``batch`` (each request's contiguous, in request order, padding last) in
    ``(tokens + requests * (width - 1)) / width`` blocks, enough for any split of the
    tokens (each request's last block wastes at most ``width - 1`` slots)."""
    tokens, requests = batch.positions.shape[0], batch.block_tables.shape[0]
    chosen = batch.positions >= 0 if chosen is None else chosen
    if width == 1:  # a block per token, in the tokens' order
        order = jnp.arange(tokens)
        return QueryBlocks(order[:, None], chosen[:, None], batch.rows, order)
    index = jnp.arange(tokens)
    counts = jax.ops.segment_sum(chosen.astype(jnp.int32), batch.rows, requests)
    starts = jax.ops.segment_min(jnp.where(chosen, index, tokens), batch.rows, requests)  # each request's first token
    per_request = -(-counts // width)
    first_block = jnp.cumsum(per_request) - per_request
    blocks = -(-(tokens + requests * (width - 1)) // width)
    block = jnp.arange(blocks)
    owner = jnp.clip(jnp.searchsorted(first_block + per_request, block, side="right"), 0, requests - 1)
    offset = (block - first_block[owner]) * width  # the block's first token within its request
    within = offset[:, None] + jnp.arange(width)[None, :]
    slot_real = (within < counts[owner][:, None]) & (block < (first_block + per_request)[-1])[:, None]
    at = jnp.clip(jnp.minimum(starts[owner], tokens)[:, None] + within, 0, tokens - 1)
    rank = index - starts[batch.rows]  # a token's index within its request
    slot = (first_block[batch.rows] + rank // width) * width + rank % width
    return QueryBlocks(at, slot_real, owner, jnp.where(chosen, slot, 0))


def xla_paged_attention(
    query: jax.Array,
    pool: jax.Array,
    batch: PagedBatch,
    *,
    scale: float,
    sliding_window: int | None = None,
    softcap: float | None = None,
    sinks: jax.Array | None = None,
    attention_chunk: int | None = None,
    alibi_slopes: jax.Array | None = None,
    context_chunk: int = CONTEXT_CHUNK,
    new_rows: int | None = None,
) -> jax.Array:
    """Each token's attention [tokens, q_heads, dim] over its request's cached positions
    ``<=`` its own (and ``> position - sliding_window``; with ``attention_chunk``, Llama
    4's chunked attention, only those in its own chunk of that many positions); with
    ``alibi_slopes`` [q_heads], each head's scores gain its slope times the key's distance
    from the query (ALiBi). The pool already holds this step's keys and values
    (:func:`write_kv`).

    Two parts joined by an online softmax, so a step costs what its contexts hold, not
    ``max_model_len``, and no context length is a compiled shape:

    - the step's own tokens attend to each other densely (``tokens x tokens``): a prompt
      chunk reads its own keys once, not once per token;
    - the positions cached before each request's first token in the step are read in
      query blocks (:func:`query_blocks`: a block's queries share one read of their
      request's context and one matrix product), a few blocks at a time, each few in a
      loop over the chunks of ``context_chunk`` positions that its queries reach
      (:func:`_read_context`; bounds computed on the device), and not at all in a step
      of new prompts. The requests with one token in the step (decodes) have blocks of
      one token, read apart from the other requests' (prompt chunks), so that a decode
      never pays for a prompt chunk's block width. Where one chunk holds a whole block
      table (``max_model_len`` up to ``context_chunk``), bounds would save little: all
      blocks (padding's too) are read at once, decodes among them, in a program about
      half the size to compile; a decode step's too.

    A step with fewer than two tokens per request on average (decodes) has blocks of one
    token: each reads its request's positions up to its own from the pool (which holds
    the step's keys already), with no dense part.
    A step whose tokens are rows of ``new_rows`` tokens, each row one request's new
    tokens (padding anywhere in it, position -1) with nothing cached before them (the
    prompts ``generate()`` prefills), is only the dense part, within each row.
    Scores are laid out heads first (``[kv, g, queries, keys]``), as a dense attention's:
    on XLA:CPU the tokens-first layout took twice as long."""
    blocks, block_size, heads, dim = pool.shape
    kv_heads, tokens, q_heads = heads // 2, query.shape[0], query.shape[1]
    q = query.reshape(tokens, kv_heads, q_heads // kv_heads, dim)
    flat = pool.reshape(blocks * block_size, heads, dim)
    positions, rows = batch.positions, batch.rows
    real = positions >= 0

    slopes = None if alibi_slopes is None else alibi_slopes.astype(jnp.float32).reshape(kv_heads, -1, 1)

    earliest = jnp.zeros_like(positions)  # the first position each token may attend to
    if sliding_window is not None:
        earliest = jnp.maximum(earliest, positions - sliding_window + 1)
    if attention_chunk is not None:
        earliest = jnp.maximum(earliest, positions // attention_chunk * attention_chunk)

    if new_rows is not None:  # each row of new tokens attends within itself only
        by_row = positions.reshape(-1, new_rows)
        visible = _visible(by_row[:, None, :], by_row[:, :, None], earliest.reshape(by_row.shape)[..., None])
        own = jnp.swapaxes(flat[batch.slots].reshape(-1, new_rows, heads, dim), 1, 2)
        rowwise = jax.vmap(functools.partial(_own_softmax, scale=scale, softcap=softcap, slopes=slopes))
        state = rowwise(q.reshape(-1, new_rows, *q.shape[1:]), own, visible, by_row)
        return _normalized(*(part.reshape(tokens, *part.shape[2:]) for part in state), sinks, query)

    read = functools.partial(
        _read_context, q, flat, batch.block_tables, earliest, positions,
        block_size=block_size, context_chunk=context_chunk, scale=scale, softcap=softcap, slopes=slopes,
    )
    requests = batch.block_tables.shape[0]
    width = max(1, min(MAX_QUERY_BLOCK, 1 << max(tokens // requests - 1, 0).bit_length()))
    if width == 1:  # a query per block: each token reads its request's positions up to its own from the pool
        grid = query_blocks(batch, 1)
        high, total, acc = (part[:, 0] for part in read(grid, jnp.where(real, positions + 1, 0)[:, None]))
        return _normalized(high, total, acc, sinks, query)

    # The step's own keys: token s is visible to token t of the same request at or after it.
    own = flat[batch.slots]  # [tokens, 2 * kv_heads, dim]
    visible = (rows[:, None] == rows[None, :]) & _visible(positions[None, :], positions[:, None], earliest[:, None])
    state = _own_softmax(q, jnp.swapaxes(own, 0, 1), visible, positions, scale, softcap, slopes)
    # The cached positions, those before each request's first token in this step: each
    # token reads those < its request's first position.
    first = jax.ops.segment_min(jnp.where(real, positions, jnp.iinfo(jnp.int32).max), rows, requests)
    _, chunks = _context_chunks(batch.block_tables.shape[1], block_size, context_chunk)
    if chunks == 1:
        reads = ((query_blocks(batch, width), real),)  # one chunk holds every context: one read of all
    else:
        # Decodes read in blocks of one, a block per request (masked for a request with
        # more tokens), apart from the other requests' tokens in blocks of ``width``.
        counts = jax.ops.segment_sum(real.astype(jnp.int32), rows, requests)
        alone = real & (counts[rows] == 1)  # a request's only token in the step (a decode)
        in_chunks = real & ~alone  # the tokens of requests with more (prompt chunks)
        only = jax.ops.segment_min(jnp.where(alone, jnp.arange(tokens), tokens), rows, requests)
        single = QueryBlocks(jnp.minimum(only, tokens - 1)[:, None], (counts == 1)[:, None], jnp.arange(requests), rows)
        reads = ((single, alone), (query_blocks(batch, width, in_chunks), in_chunks))
    for grid, chosen in reads:
        cached = jnp.where(grid.real, first[grid.requests][:, None], 0)  # [blocks, width]: reads < it

        def joined(state: Carry, grid: QueryBlocks = grid, cached: jax.Array = cached, chosen: jax.Array = chosen) -> Carry:
            context = read(grid, cached)
            context = (part.reshape(-1, *part.shape[2:])[grid.slot_of_token] for part in context)
            return _merge(state, tuple(jnp.where(chosen.reshape(-1, *(1,) * (part.ndim - 1)), part, empty)
                                       for part, empty in zip(context, _empty_state(q.shape))))

        state = jax.lax.cond(jnp.any(cached > earliest[grid.tokens]), joined, lambda state: state, state)
    return _normalized(*state, sinks, query)


def _read_context(q: jax.Array, flat: jax.Array, tables: jax.Array, earliest: jax.Array, positions: jax.Array,
                  grid: QueryBlocks, cached: jax.Array, *, block_size: int, context_chunk: int, scale: float,
                  softcap: float | None, slopes: jax.Array | None) -> Carry:
    """The softmax state [blocks, width, kv, g, ...] of ``grid``'s queries (``q`` [tokens,
    kv, g, dim]) over their requests' positions from their ``earliest`` to before
    ``cached`` [blocks, width], read from ``flat`` (the pool's slots) by block ``tables``.

    The blocks that read anything go in groups of :data:`QUERY_BLOCK_GROUP`, those reading
    furthest first, and each group loops over the chunks of ``context_chunk`` positions
    that its own queries reach: a step pays for each block's context, not for the
    longest one times the blocks (and, past one group, nothing for blocks that read nothing).
    Where one chunk holds a whole block table, every block reads that chunk at once."""
    per_request = tables.shape[1]
    blocks = cached.shape[0]
    per_chunk, chunks = _context_chunks(per_request, block_size, context_chunk)
    tables = jnp.pad(tables, ((0, 0), (0, chunks * per_chunk - per_request)))
    span = per_chunk * block_size
    offsets = jnp.arange(block_size)
    block_q = jnp.moveaxis(q[grid.tokens], 1, 3)  # [blocks, kv, g, width, dim]: heads first, as a dense attention's
    block_earliest, block_positions = earliest[grid.tokens], positions[grid.tokens]
    limits = jnp.where(cached > block_earliest, cached, 0)  # [blocks, width]: 0 for a query reading nothing

    def read_group(members: jax.Array) -> Carry:
        """The state [group, kv, g, width, ...] of blocks ``members`` (a member ``blocks``,
        past the last block, is padding and reads nothing)."""
        take = functools.partial(jnp.take, indices=members, axis=0, mode="clip")
        limit = jnp.where((members < blocks)[:, None], take(limits), 0)
        since = take(block_earliest)
        group_q, group_positions, group_tables = take(block_q), take(block_positions), tables[take(grid.requests)]

        def chunk(index: jax.Array, carry: Carry) -> Carry:
            """``carry`` joined by positions ``index * span ...``."""
            ids = jax.lax.dynamic_slice_in_dim(group_tables, index * per_chunk, per_chunk, axis=1)
            slots = (ids[:, :, None] * block_size + offsets).reshape(-1, span)
            # [group, kv_heads, span, dim] each, keys and values gathered apart (one gather
            # of both, sliced after, took XLA:CPU longer)
            keys, values = (jnp.swapaxes(flat[:, part::2][slots], 1, 2) for part in (0, 1))
            context = index * span + jnp.arange(span)
            allowed = (context < limit[..., None]) & (context >= since[..., None])  # [group, width, span]
            bias = None if slopes is None else slopes[..., None] * (context - group_positions[..., None])[:, None, None]
            return _merge(carry, _chunk_softmax(group_q, keys, values, allowed[:, None, None], scale, softcap, bias))

        empty = _empty_state(group_q.shape)
        if chunks == 1:
            return chunk(0, empty)
        start = jnp.min(jnp.where(limit > 0, since, jnp.iinfo(jnp.int32).max)) // span
        end = (jnp.max(limit) - 1) // span + 1
        return jax.lax.fori_loop(jnp.minimum(start, end), end, chunk, empty)

    group = blocks if chunks == 1 else min(QUERY_BLOCK_GROUP, blocks)  # one chunk: nothing to bound
    if group == blocks:
        state = read_group(jnp.arange(blocks))
    else:
        reach = jnp.max(limits, axis=1)
        groups = -(-blocks // group)
        order = jnp.pad(jnp.argsort(-reach, stable=True), (0, groups * group - blocks), constant_values=blocks)

        def read_next(index: jax.Array, state: Carry) -> Carry:
            members = jax.lax.dynamic_slice_in_dim(order, index * group, group)
            return tuple(whole.at[members].set(part, mode="drop") for whole, part in zip(state, read_group(members)))

        state = jax.lax.fori_loop(0, -(-jnp.sum(reach > 0) // group), read_next, _empty_state(block_q.shape))
    return tuple(jnp.moveaxis(part, 3, 1) for part in state)  # [blocks, width, kv, g, ...]


def _context_chunks(per_request: int, block_size: int, context_chunk: int) -> tuple[int, int]:
    """How many of a request's ``per_request`` blocks one chunk of the context read
    holds (about ``context_chunk`` positions), and how many chunks hold them all."""
    per_chunk = max(1, min(context_chunk // block_size, per_request))
    return per_chunk, -(-per_request // per_chunk)


def _empty_state(shape: tuple[int, ...]) -> Carry:
    """The softmax state of queries ``shape`` (``[..., dim]``) over no positions."""
    return (jnp.full(shape[:-1], jnp.finfo(jnp.float32).min), jnp.zeros(shape[:-1]), jnp.zeros(shape, jnp.float32))


def _context_scores(queries: jax.Array, keys: jax.Array) -> jax.Array:
    """Query blocks' scores [blocks, kv, g, width, span] (float32) against their
    context's ``keys`` [blocks, kv, span, dim]. On CPU the keys go first and the product
    is transposed after, behind an optimization barrier: XLA:CPU otherwise copies every
    gathered key block transposed, which took longer than the products themselves."""
    if jax.default_backend() != "cpu":
        return jnp.einsum("bhgwd,bhnd->bhgwn", queries, keys, preferred_element_type=jnp.float32)
    keys_first = jnp.einsum("bhnd,bhgwd->bhngw", keys, queries, preferred_element_type=jnp.float32)
    return jnp.moveaxis(jax.lax.optimization_barrier(keys_first), 2, -1)


def _chunk_softmax(queries: jax.Array, keys: jax.Array, values: jax.Array, allowed: jax.Array, scale: float,
                   softcap: float | None, bias: jax.Array | None = None) -> Carry:
    """The softmax state [b, kv, g, width, ...] of query blocks ``queries`` [b, kv, g,
    width, dim] over one chunk of their context's ``keys`` and ``values`` [b, kv, span,
    dim], where ``allowed`` ([b, 1, 1, width, span], broadcast): scores scaled,
    soft-capped, plus ``bias`` (ALiBi's) if any; a query allowed none keeps an empty state."""
    scores = _context_scores(queries, keys) * scale
    scores = scores if softcap is None else jnp.tanh(scores / softcap) * softcap
    if bias is not None:
        scores = scores + bias
    scores = jnp.where(allowed, scores, jnp.finfo(jnp.float32).min)
    high = scores.max(axis=-1)
    weights = jnp.where(allowed, jnp.exp(scores - high[..., None]), 0.0)
    weighted = jnp.einsum("bhgwn,bhnd->bhgwd", weights.astype(values.dtype), values, preferred_element_type=jnp.float32)
    return high, weights.sum(axis=-1), weighted


def _visible(keys: jax.Array, queries: jax.Array, earliest: jax.Array) -> jax.Array:
    """Whether a key at position ``keys`` is visible to a query of the same request at
    ``queries`` whose window starts at ``earliest`` (broadcast together): real, at or
    before the query, not before its window."""
    return (keys >= 0) & (keys <= queries) & (keys >= earliest)


def _normalized(high: jax.Array, total: jax.Array, acc: jax.Array, sinks: jax.Array | None, query: jax.Array) -> jax.Array:
    """The attention (``query``'s shape and dtype) from each token's softmax state over
    its keys ([tokens, kv, g, ...]), each head's sink logit, if any, joining the
    denominator only."""
    if sinks is not None:
        sink = sinks.astype(jnp.float32).reshape(high.shape[1:])
        peak = jnp.maximum(high, sink)
        acc, total = acc * jnp.exp(high - peak)[..., None], total * jnp.exp(high - peak) + jnp.exp(sink - peak)
    out = acc / jnp.where(total > 0, total, 1.0)[..., None]  # finite for padding tokens (their output is unread)
    return out.reshape(query.shape).astype(query.dtype)


def _own_softmax(query: jax.Array, own: jax.Array, visible: jax.Array, positions: jax.Array, scale: float,
                 softcap: float | None, slopes: jax.Array | None) -> Carry:
    """The softmax state of queries [t, kv, g, dim] over the step's own keys and values
    (``own`` [2 * kv, n, dim]) where ``visible`` [t, n], in the tokens' order. Scores are
    laid out heads first, as a dense attention's (half the time of tokens first on
    XLA:CPU), and need no second mask: every real token sees itself, and a padding
    token's (unread) state stays finite."""
    scores = jnp.einsum("hgtd,hnd->hgtn", jnp.moveaxis(query, 0, 2), own[0::2], preferred_element_type=jnp.float32)
    scores = scores * scale
    scores = scores if softcap is None else jnp.tanh(scores / softcap) * softcap
    if slopes is not None:
        scores = scores + slopes[..., None] * (positions[None, :] - positions[:, None])
    scores = jnp.where(visible, scores, jnp.finfo(jnp.float32).min)
    high = scores.max(axis=-1)
    weights = jnp.exp(scores - high[..., None])
    weighted = jnp.einsum("hgtn,hnd->hgtd", weights.astype(own.dtype), own[1::2], preferred_element_type=jnp.float32)
    return jnp.moveaxis(high, -1, 0), jnp.moveaxis(weights.sum(axis=-1), -1, 0), jnp.moveaxis(weighted, 2, 0)


def _merge(a: Carry, b: Carry) -> Carry:
    """One softmax state from two over disjoint positions."""
    high = jnp.maximum(a[0], b[0])
    decay_a, decay_b = jnp.exp(a[0] - high), jnp.exp(b[0] - high)
    return high, a[1] * decay_a + b[1] * decay_b, a[2] * decay_a[..., None] + b[2] * decay_b[..., None]


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


def sparse_paged_attention(
    query: jax.Array,
    pool: jax.Array,
    batch: PagedBatch,
    *,
    scale: float,
    indices: jax.Array,
    softcap: float | None = None,
    sinks: jax.Array | None = None,
    row_width: int | None = None,
    context_chunk: int = CONTEXT_CHUNK,
) -> jax.Array:
    """Each token's attention [tokens, q_heads, dim] over the positions ``indices``
    [tokens, k] of its request that are ``<=`` its own: a sparse-attention indexer's
    top-k choice (DeepSeek-V3.2's DSA; a choice past the token's position, which its
    indexer makes when fewer than k positions are visible, is masked out as transformers'
    causal mask does, and -1 chooses nothing). The pool holds the step's keys already.
    Each token gathers its k keys and values, so a step of decodes costs ``tokens x k``
    whatever the contexts' lengths. With ``row_width`` > 1 (the step's tokens are rows of that many, one
    request per row, as block tables: new prompts), each row instead reads its request's
    block table once (in chunks of ``context_chunk`` positions, up to the furthest one
    the step reaches) and its queries attend to it under their chosen positions' mask:
    the queries of a prompt share their keys, where gathering would read them once per
    query."""
    if row_width is not None and row_width > 1:
        return _sparse_rows(query, pool, batch, scale, indices, softcap, sinks, row_width, context_chunk)
    blocks, block_size, heads, dim = pool.shape
    tokens, q_heads = query.shape[:2]
    kv = heads // 2
    tables = batch.block_tables[batch.rows]  # [tokens, blocks per request]
    chosen = jnp.clip(indices, 0, tables.shape[1] * block_size - 1)
    slots = jnp.take_along_axis(tables, chosen // block_size, axis=1) * block_size + chosen % block_size
    flat = pool.reshape(blocks * block_size, heads, dim)
    keys, values = (jnp.swapaxes(flat[:, part::2][slots], 1, 2) for part in (0, 1))  # [tokens, kv, k, dim]
    q = query.reshape(tokens, kv, q_heads // kv, 1, dim)  # a query block of one per token
    visible = (indices >= 0) & (indices <= batch.positions[:, None])  # [tokens, k]
    state = _chunk_softmax(q, keys, values, visible[:, None, None, None, :], scale, softcap)
    return _normalized(*(part[:, :, :, 0] for part in state), sinks, query)


def _sparse_rows(query: jax.Array, pool: jax.Array, batch: PagedBatch, scale: float, indices: jax.Array,
                 softcap: float | None, sinks: jax.Array | None, width: int, context_chunk: int) -> jax.Array:
    """:func:`sparse_paged_attention` over rows of ``width`` tokens, each row one
    request's (row ``r``: block table ``r``): each row reads its table once, in chunks of
    about ``context_chunk`` positions up to the furthest position of the step (a bound
    on the device) joined by an online softmax, so a step holds one chunk's scores at a
    time, laid out heads first as a dense attention's."""
    blocks, block_size, heads, dim = pool.shape
    tokens, q_heads = query.shape[:2]
    kv, rows = heads // 2, tokens // width
    per_chunk, chunks = _context_chunks(batch.block_tables.shape[1], block_size, context_chunk)
    tables = jnp.pad(batch.block_tables, ((0, 0), (0, chunks * per_chunk - batch.block_tables.shape[1])))
    span = per_chunk * block_size
    picked = jnp.where(indices >= 0, indices, chunks * span)  # -1 (a kernel's padding of the choice) picks nothing
    chosen = jnp.zeros((tokens, chunks * span), bool).at[jnp.arange(tokens)[:, None], picked].set(True, mode="drop")
    visible = chosen & (jnp.arange(chunks * span) <= batch.positions[:, None])  # padding (position -1) sees nothing
    q = jnp.moveaxis(query.reshape(rows, width, kv, q_heads // kv, dim), 1, 3)  # [rows, kv, g, width, dim]
    flat, offsets = pool.reshape(blocks * block_size, heads, dim), jnp.arange(block_size)

    def read(chunk: jax.Array, state: Carry) -> Carry:
        """``state`` [rows, kv, g, width, ...] joined with the chunk's positions."""
        ids = jax.lax.dynamic_slice_in_dim(tables, chunk * per_chunk, per_chunk, axis=1)
        slots = (ids[:, :, None] * block_size + offsets).reshape(rows, span)
        keys, values = (jnp.swapaxes(flat[:, part::2][slots], 1, 2) for part in (0, 1))  # [rows, kv, span, dim]
        seen = jax.lax.dynamic_slice_in_dim(visible, chunk * span, span, axis=1).reshape(rows, 1, 1, width, span)
        return _merge(state, _chunk_softmax(q, keys, values, seen, scale, softcap))

    reached = jnp.max(batch.positions) // span + 1  # the chunks any token of the step reaches
    high, total, acc = jax.lax.fori_loop(0, reached, read, _empty_state((rows, kv, q_heads // kv, width, dim)))

    def by_token(state: jax.Array) -> jax.Array:  # [rows, kv, g, width, ...] -> [tokens, kv, g, ...]
        return jnp.moveaxis(state, 3, 1).reshape(tokens, kv, q_heads // kv, *state.shape[4:])

    return _normalized(by_token(high), by_token(total), by_token(acc), sinks, query)


@functools.cache
def _on_tpu() -> bool:
    return jax.default_backend() == "tpu"


XLA_ONLY_OPTIONS = ("sinks", "attention_chunk", "alibi_slopes", "new_rows")  # what the Pallas kernel does not take
SPARSE_OPTIONS = ("scale", "indices", "softcap", "sinks", "row_width")  # what the sparse kernel takes


def paged_attention_kernel(options: Mapping[str, Any]) -> Callable[..., jax.Array]:
    """The kernel for this platform that takes ``options`` (the keyword arguments it will
    be called with): with ``indices``, the sparse one (any platform); else Pallas on
    TPU, unless one of :data:`XLA_ONLY_OPTIONS` is set; XLA elsewhere."""
    if options.get("indices") is not None:
        unsupported = [name for name, value in options.items() if value is not None and name not in SPARSE_OPTIONS]
        if unsupported:
            raise InvalidArgumentError(f"the sparse paged attention (top-k indices) takes no {', '.join(unsupported)}")
        return sparse_paged_attention
    if _on_tpu() and all(options.get(name) is None for name in XLA_ONLY_OPTIONS):
        return pallas_paged_attention
    return xla_paged_attention


def attend(
    kernel: Callable[..., jax.Array],
    query: jax.Array,
    pool: jax.Array,
    batch: PagedBatch,
    written: tuple[jax.Array, jax.Array] | None = None,
    **options: Any,
) -> tuple[jax.Array, jax.Array]:
    """``kernel``'s attention of ``query`` over ``pool`` after ``written`` (the step's new
    keys and values [tokens, kv_heads, dim]; None for a call that reads another's pool)
    are written at ``batch.slots``, and the pool after."""
    if written is not None:
        pool = write_kv(pool, *written, batch.slots)
    return kernel(query, pool, batch, **options), pool


def per_device(
    kernel: Callable[..., jax.Array], mesh: Mesh, heads_axis: str | None, replica_axes: Axis = None,
) -> Callable[..., tuple[jax.Array, jax.Array]]:
    """:func:`attend` with ``kernel`` run by each device of ``mesh`` on its own data (a
    ``shard_map``): GSPMD never partitions its inside, so its loop and branch (bounded by
    values on the device) hold no collective, and a Pallas call (which GSPMD cannot split)
    runs as written.

    - With ``heads_axis``, the queries, new keys and values, the pool, the sinks and ALiBi
      slopes split over that mesh axis by head: each device attends over its own key
      heads (a pool interleaves each key head with its value head, so every device holds
      whole pairs; with GQA, its query heads are those of its key heads). Without (a pool
      of too few heads to split, or a mesh with no tensor axis), every device holds them whole.
    - Per-token options (a sparse kernel's ``indices``) split as the tokens do.
    - With ``replica_axes`` (the mesh axes a batch is split over), the step's tokens and
      requests split over them as they come, and each pool by block: every replica holds
      its own pool, its own null block 0 first, which its requests' block tables and slots
      number from (``generate()`` over a batch split by data parallelism). Without, every
      device takes the whole batch and every block."""

    def run(query: jax.Array, pool: jax.Array, batch: PagedBatch, written: tuple[jax.Array, jax.Array] | None = None,
            **options: Any) -> tuple[jax.Array, jax.Array]:
        per_head = {name: options.pop(name) for name in PER_HEAD_OPTIONS if options.get(name) is not None}
        per_token = {name: options.pop(name) for name in PER_TOKEN_OPTIONS if options.get(name) is not None}

        def local(query, pool, batch, written, per_head, per_token) -> tuple[jax.Array, jax.Array]:
            return attend(kernel, query, pool, batch, written, **options, **per_head, **per_token)

        if heads_axis is not None and (pool.shape[2] // 2) % mesh.shape[heads_axis]:
            raise InvalidArgumentError(
                f"{pool.shape[2] // 2} key heads do not split over the {mesh.shape[heads_axis]} devices of mesh axis {heads_axis!r}"
            )
        tokens, blocks = P(replica_axes, heads_axis), P(replica_axes, None, heads_axis)
        split = jax.shard_map(local, mesh=mesh, out_specs=(tokens, blocks), check_vma=False,
                              in_specs=(tokens, blocks, P(replica_axes), None if written is None else tokens,
                                        {n: P(heads_axis) for n in per_head}, {n: P(replica_axes) for n in per_token}))
        return split(query, pool, batch, written, per_head, per_token)

    return run
