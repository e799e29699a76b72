"""Paged attention (gather by block table) against dense attention over each request's
own keys: decode-only, prefill-only and mixed steps, GQA, a sliding window, soft-capping
and sinks, with blocks scattered over the pool in any order."""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ttpu.backends.jax.attention import dot_product_attention
from ttpu.backends.jax.paged_attention import (
    PagedBatch, attend, pallas_paged_attention, query_blocks, ragged_arguments, per_device, sparse_paged_attention,
    write_kv, xla_paged_attention,
)

BLOCK, BLOCKS, KV_HEADS, Q_HEADS, DIM = 4, 32, 2, 4, 8


# chunks of two blocks: the XLA kernel's context loop takes several turns
SMALL_CHUNKS = functools.partial(xla_paged_attention, context_chunk=2 * BLOCK)


def compiled(kernel):
    """``kernel`` as one compiled program, its array options traced and the others static
    (a shard_map run eagerly dispatches each of its operations on every device: ~10x slower)."""

    def run(*args, **options):
        arrays = {name: value for name, value in options.items() if isinstance(value, jax.Array)}
        static = {name: value for name, value in options.items() if name not in arrays}
        return jax.jit(functools.partial(kernel, **static))(*args, **arrays)

    return run


class RandomStep(NamedTuple):
    """A step over random keys and values: its inputs, and each request's whole sequence."""

    query: np.ndarray  # [tokens, q_heads, dim] the step's tokens' queries, padding last
    new_keys: np.ndarray  # [tokens, kv_heads, dim] their keys and values
    new_values: np.ndarray
    pool: np.ndarray  # the pool before the step: the cached positions written
    batch: PagedBatch
    keys: list[np.ndarray]  # per request, its whole sequence's
    values: list[np.ndarray]
    queries: list[np.ndarray]  # per request, its new tokens'


def random_step(contexts: list[int], news: list[int], seed: int, dim: int = DIM) -> RandomStep:
    """Requests with ``contexts[i]`` cached positions computing ``news[i]`` more, their
    blocks scattered over the pool in random order, 3 padding tokens last."""
    DIM = dim  # noqa: N806  the head width of this run
    rng = np.random.default_rng(seed)
    free = list(rng.permutation(np.arange(1, BLOCKS)))  # block 0 is the null block
    width = max(-(-(c + n) // BLOCK) for c, n in zip(contexts, news))
    tables = np.zeros((len(contexts), width), np.int32)
    full_keys, full_values = [], []
    key_pool = np.zeros((BLOCKS * BLOCK, KV_HEADS, DIM), np.float32)  # filled below, then interleaved
    value_pool = np.zeros_like(key_pool)
    positions, slots, rows, queries = [], [], [], []
    for row, (cached, new) in enumerate(zip(contexts, news)):
        blocks = [free.pop() for _ in range(-(-(cached + new) // BLOCK))]
        tables[row, : len(blocks)] = blocks
        keys = rng.normal(size=(cached + new, KV_HEADS, DIM)).astype(np.float32)
        values = rng.normal(size=(cached + new, KV_HEADS, DIM)).astype(np.float32)
        full_keys.append(keys)
        full_values.append(values)
        for position in range(cached + new):
            slot = blocks[position // BLOCK] * BLOCK + position % BLOCK
            if position < cached:  # already in the cache
                key_pool[slot], value_pool[slot] = keys[position], values[position]
            else:
                positions.append(position)
                slots.append(slot)
                rows.append(row)
        queries.append(rng.normal(size=(new, Q_HEADS, DIM)).astype(np.float32))
    # Padding tokens: the null block's slots, row 0, position -1 (attend to nothing real).
    for _ in range(3):
        positions.append(-1)
        slots.append(0)
        rows.append(0)
    new_keys = np.concatenate([k[c:] for k, c in zip(full_keys, contexts)] + [np.zeros((3, KV_HEADS, DIM), np.float32)])
    new_values = np.concatenate([v[c:] for v, c in zip(full_values, contexts)] + [np.zeros((3, KV_HEADS, DIM), np.float32)])
    query = np.concatenate(queries + [np.zeros((3, Q_HEADS, DIM), np.float32)])
    batch = PagedBatch(*(jnp.asarray(np.asarray(a, np.int32)) for a in (positions, slots, rows, tables)))
    pool = np.stack([key_pool, value_pool], axis=2).reshape(BLOCKS, BLOCK, 2 * KV_HEADS, DIM)
    return RandomStep(query, new_keys, new_values, pool, batch, full_keys, full_values, queries)


def run_step(contexts: list[int], news: list[int], seed: int, kernel=SMALL_CHUNKS, dim: int = DIM, **options):
    """Requests with ``contexts[i]`` cached positions computing ``news[i]`` more: the
    paged result for the new tokens (by ``kernel``) against the dense one, per request."""
    DIM = dim  # noqa: N806  the head width of this run
    step = random_step(contexts, news, seed, dim)
    queries, full_keys, full_values, batch = step.queries, step.keys, step.values, step.batch
    pool = write_kv(jnp.asarray(step.pool), jnp.asarray(step.new_keys), jnp.asarray(step.new_values), batch.slots)
    paged = kernel(jnp.asarray(step.query), pool, batch, scale=DIM**-0.5, **options)
    paged = np.asarray(paged)
    dense, start = [], 0
    window = options.get("sliding_window")
    for row, (cached, new) in enumerate(zip(contexts, news)):
        total = cached + new
        query_positions = np.arange(cached, total)[:, None]
        mask = np.arange(total)[None, :] <= query_positions
        if window:
            mask &= np.arange(total)[None, :] > query_positions - window
        if options.get("attention_chunk"):
            mask &= np.arange(total)[None, :] // options["attention_chunk"] == query_positions // options["attention_chunk"]
        if options.get("indices") is not None:  # each token sees the positions chosen for it only
            chosen = np.zeros_like(mask)
            for query_row, picked in enumerate(np.asarray(options["indices"])[start : start + new]):
                chosen[query_row, picked[picked < total]] = True
            mask &= chosen
        mask = mask[None, None]
        if options.get("alibi_slopes") is not None:  # additive: each head's slope times the key's distance
            bias = np.asarray(options["alibi_slopes"])[:, None, None] * (np.arange(total)[None, :] - query_positions)
            mask = np.where(mask, bias[None], np.finfo(np.float32).min)
        out = dot_product_attention(
            jnp.asarray(queries[row].transpose(1, 0, 2)[None]), jnp.asarray(full_keys[row].transpose(1, 0, 2)[None]),
            jnp.asarray(full_values[row].transpose(1, 0, 2)[None]), jnp.asarray(mask), scale=DIM**-0.5,
            softcap=options.get("softcap"), sinks=options.get("sinks"),
        )[0]
        dense.append(np.asarray(out))
        np.testing.assert_allclose(paged[start : start + new], dense[-1], rtol=2e-5, atol=2e-5)
        start += new
    assert np.isfinite(paged).all()  # padding tokens too


MIXED = ([12, 0, 3, 8], [1, 11, 6, 1])  # decodes, a new prompt, a chunk after cached positions
MANY_DECODES = [3, 21, 7, 13, 0, 9, 17, 5, 2, 11]  # contexts of decodes in more query blocks than one group holds
DECODES_BESIDE_A_CHUNK = ([3, 21, 7, 13, 0, 9, 2, 5, 2, 11, 4], [1] * 10 + [12])
ALIBI_SLOPES = jnp.asarray([0.5, 0.25, 0.125, 0.0625])[:Q_HEADS]


@pytest.mark.parametrize(
    "contexts, news, options",
    [
        ([5, 17, 0, 9], [1, 1, 1, 1], {}),  # decode only
        ([0, 0, 0], [7, 13, 1], {}),  # prefill only
        (*MIXED, {}),
        ([3, 9, 5], [20, 1, 13], {}),  # a request whose new tokens after cached ones fill two query blocks
        (*MIXED, {"sliding_window": 5}),
        ([20, 14], [1, 2], {"sliding_window": 5}),  # every window starts past the first chunk: the loop does too
        (*MIXED, {"softcap": 2.0}),
        (*MIXED, {"sinks": jnp.linspace(-1.0, 1.0, Q_HEADS)}),
        (*MIXED, {"attention_chunk": 4}),  # Llama 4's chunked attention
        ([20, 14], [1, 2], {"attention_chunk": 8}),  # every chunk starts past the first context chunk: the loop may too
        (*MIXED, {"alibi_slopes": ALIBI_SLOPES}),  # BLOOM's linear biases
        ([40, 9], [1, 20], {"alibi_slopes": ALIBI_SLOPES}),  # contexts over several context chunks
        (MANY_DECODES, [1] * len(MANY_DECODES), {}),  # blocks in two groups, each looping over its own chunks
        (MANY_DECODES, [1] * len(MANY_DECODES), {"sliding_window": 6}),
        ([20, 3, 2, 4, 6], [9, 9, 9, 9, 2], {}),  # nine query blocks of prompt chunks reading: two groups
        (*DECODES_BESIDE_A_CHUNK, {}),  # two groups of decodes beside a prompt chunk
        (MANY_DECODES, [1] * len(MANY_DECODES), {"context_chunk": 128}),  # one chunk holds every context: one read of all
        (*DECODES_BESIDE_A_CHUNK, {"context_chunk": 128}),  # the mixed step's one read of all, more blocks than a group
        (*DECODES_BESIDE_A_CHUNK, {"context_chunk": 128, "sliding_window": 6}),
    ],
    ids=["decode", "prefill", "mixed", "blocks-after-context", "mixed-window", "far-window", "mixed-softcap", "mixed-sinks", "mixed-chunked",
         "far-chunked", "mixed-alibi", "long-alibi", "many-decodes", "many-decodes-window", "many-blocks",
         "many-decodes-beside-a-chunk", "many-decodes-one-chunk", "beside-a-chunk-one-chunk",
         "beside-a-chunk-one-chunk-window"],
)
def test_paged_attention_matches_dense_attention(contexts, news, options) -> None:
    run_step(contexts, news, seed=len(contexts), **options)


def chosen_positions(contexts: list[int], news: list[int], k: int, seed: int) -> jax.Array:
    """Per token of :func:`random_step`'s step (padding last), ``k`` distinct positions
    of its request's block table, its own among them, some past it (a DSA indexer's
    top-k when fewer than ``k`` positions are visible: masked, as transformers does)."""
    rng = np.random.default_rng(seed)
    width = max(-(-(c + n) // BLOCK) for c, n in zip(contexts, news)) * BLOCK
    own = [p for c, n in zip(contexts, news) for p in range(c, c + n)] + [0, 0, 0]
    picks = [[p, *rng.choice([q for q in range(width) if q != p], k - 1, replace=False)] for p in own]
    return jnp.asarray(np.asarray(picks, np.int32))


@pytest.mark.parametrize("options", [{}, {"softcap": 2.0, "sinks": jnp.linspace(-1.0, 1.0, Q_HEADS)}],
                         ids=["plain", "softcap-sinks"])
def test_sparse_attention_reads_only_each_tokens_chosen_positions(options) -> None:
    """The sparse kernel (a sparse-attention indexer's top-k positions per token) against
    dense attention masked to each token's chosen positions up to its own, on decodes,
    a new prompt and a chunk after cached positions together."""
    indices = chosen_positions(*MIXED, k=5, seed=2)
    run_step(*MIXED, seed=4, kernel=sparse_paged_attention, indices=indices, **options)


@pytest.mark.parametrize("context_chunk", [128, BLOCK], ids=["one-read", "chunk-per-block"])
@pytest.mark.parametrize("options", [{}, {"softcap": 2.0, "sinks": jnp.linspace(-1.0, 1.0, Q_HEADS)}],
                         ids=["plain", "softcap-sinks"])
def test_sparse_attention_over_rows_gives_what_each_tokens_gather_gives(options, context_chunk: int) -> None:
    """``row_width``: rows of 8 new tokens, one request each (left-padded; the second row
    after 5 cached positions), each row's block table read once (or a block at a time,
    joined by an online softmax) under its tokens' chosen positions: the attention each
    token's own gather gives (checked against dense above)."""
    rng = np.random.default_rng(8)
    width, cached, news, k = 8, [0, 5, 0], [6, 3, 8], 5
    tables = 1 + np.arange(3 * 4, dtype=np.int32).reshape(3, 4)  # 16 positions per row
    positions = np.full((3, width), -1, np.int32)
    for row, (before, new) in enumerate(zip(cached, news)):
        positions[row, width - new:] = np.arange(before, before + new)
    rows = np.repeat(np.arange(3, dtype=np.int32), width).reshape(positions.shape)
    slots = np.where(positions >= 0, tables[rows, np.maximum(positions, 0) // BLOCK] * BLOCK + positions % BLOCK, 0)
    batch = PagedBatch(*(jnp.asarray(a.reshape(-1)) for a in (positions, slots, rows)), jnp.asarray(tables))
    query = jnp.asarray(rng.normal(size=(positions.size, Q_HEADS, DIM)), jnp.float32)
    keys, values = (jnp.asarray(rng.normal(size=(positions.size, KV_HEADS, DIM)), jnp.float32) for _ in range(2))
    pool = write_kv(jnp.asarray(rng.normal(size=(BLOCKS, BLOCK, 2 * KV_HEADS, DIM)), jnp.float32), keys, values,
                    batch.slots)  # cached positions hold random keys already
    own = np.maximum(positions.reshape(-1), 0)
    indices = np.asarray([[p, *rng.choice([q for q in range(16) if q != p], k - 1, replace=False)] for p in own])
    indices[::3, -1] = -1  # some choices left empty (flash-MLA's padding)
    indices = jnp.asarray(indices, jnp.int32)
    gathered = sparse_paged_attention(query, pool, batch, scale=DIM**-0.5, indices=indices, **options)
    by_rows = sparse_paged_attention(query, pool, batch, scale=DIM**-0.5, indices=indices, row_width=width,
                                     context_chunk=context_chunk, **options)
    real = positions.reshape(-1) >= 0
    np.testing.assert_allclose(np.asarray(by_rows)[real], np.asarray(gathered)[real], rtol=2e-5, atol=2e-5)
    assert np.isfinite(np.asarray(by_rows)).all()  # padding tokens too


def test_sparse_attention_splits_its_indices_with_the_tokens() -> None:
    """The sparse kernel in a shard_map over heads (tensor axis) and replicas (data axis,
    as generate() splits a batch): each replica's tokens keep their own chosen positions."""
    from jax.sharding import Mesh

    mesh = Mesh(np.array(jax.devices()[:4]).reshape(2, 2), ("data", "tensor"))
    steps = [random_step(*MIXED, seed=seed) for seed in (6, 7)]
    chosen = [chosen_positions(*MIXED, k=5, seed=seed) for seed in (6, 7)]
    joined = [np.concatenate([getattr(step, name) for step in steps]) for name in ("query", "new_keys", "new_values", "pool")]
    batch = PagedBatch(*(jnp.concatenate(parts) for parts in zip(*(step.batch for step in steps))))
    split = compiled(per_device(sparse_paged_attention, mesh, "tensor", replica_axes="data"))
    out, _ = split(jnp.asarray(joined[0]), jnp.asarray(joined[3]), batch, (jnp.asarray(joined[1]), jnp.asarray(joined[2])),
                   scale=DIM**-0.5, indices=jnp.concatenate(chosen))
    for half, (step, indices) in enumerate(zip(steps, chosen)):
        alone, _ = attend(sparse_paged_attention, jnp.asarray(step.query), jnp.asarray(step.pool), step.batch,
                          (jnp.asarray(step.new_keys), jnp.asarray(step.new_values)), scale=DIM**-0.5, indices=indices)
        tokens = step.query.shape[0]
        np.testing.assert_allclose(np.asarray(out)[half * tokens:(half + 1) * tokens], alone, rtol=2e-5, atol=2e-5)


def test_one_context_chunk_gives_what_many_give() -> None:
    run_step(*MIXED, seed=3, kernel=xla_paged_attention, sliding_window=5, softcap=2.0)


@pytest.mark.parametrize(
    "options",
    [{}, {"sliding_window": 3, "softcap": 2.0}, {"sinks": jnp.linspace(-1.0, 1.0, Q_HEADS)},
     {"alibi_slopes": ALIBI_SLOPES}, {"attention_chunk": 4}],
    ids=["plain", "window-softcap", "sinks", "alibi", "chunked"],
)
def test_rows_of_new_prompts_give_what_the_ragged_step_gives(options) -> None:
    """``new_rows``: prompts left-padded in rows of 8 (generate()'s prefill) attend within
    their rows, as the same prompts laid out ragged (each one's tokens together, padding
    last), which the tests above check against dense attention."""
    rng = np.random.default_rng(5)
    lengths, width = [5, 8, 1, 3], 8
    tables = 1 + np.arange(len(lengths) * 2, dtype=np.int32).reshape(len(lengths), 2)
    positions = np.full((len(lengths), width), -1, np.int32)
    for row, length in enumerate(lengths):
        positions[row, width - length:] = np.arange(length)
    rows = np.repeat(np.arange(len(lengths), dtype=np.int32), width).reshape(positions.shape)
    slots = np.where(positions >= 0, tables[rows, np.maximum(positions, 0) // BLOCK] * BLOCK + positions % BLOCK, 0)
    query = jnp.asarray(rng.normal(size=(positions.size, Q_HEADS, DIM)), jnp.float32)
    keys, values = (jnp.asarray(rng.normal(size=(positions.size, KV_HEADS, DIM)), jnp.float32) for _ in range(2))
    as_rows = PagedBatch(*(jnp.asarray(a.reshape(-1)) for a in (positions, slots, rows)), jnp.asarray(tables))
    pool = write_kv(jnp.zeros((BLOCKS, BLOCK, 2 * KV_HEADS, DIM)), keys, values, as_rows.slots)
    by_rows = xla_paged_attention(query, pool, as_rows, scale=DIM**-0.5, new_rows=width, **options)
    real = np.flatnonzero(positions.reshape(-1) >= 0)  # the same tokens, each prompt's together, padding last
    order = np.concatenate([real, np.flatnonzero(positions.reshape(-1) < 0)])
    ragged = PagedBatch(*(jnp.asarray(np.where(np.arange(order.size) < real.size, a.reshape(-1)[order], fill))
                          for a, fill in ((positions, -1), (slots, 0), (rows, 0))), jnp.asarray(tables))
    expected = SMALL_CHUNKS(query[order], pool, ragged, scale=DIM**-0.5, **options)
    np.testing.assert_allclose(np.asarray(by_rows)[real], np.asarray(expected)[: real.size], rtol=2e-5, atol=2e-5)
    assert np.isfinite(np.asarray(by_rows)).all()  # padding tokens too


@pytest.mark.parametrize(
    "options",
    [{"sliding_window": 5, "softcap": 2.0}, {"sinks": jnp.linspace(-1.0, 1.0, Q_HEADS)}, {"alibi_slopes": ALIBI_SLOPES}],
    ids=["window-softcap", "sinks", "alibi"],
)
@pytest.mark.parametrize(
    "shape, heads_axis",
    [((KV_HEADS,), "tensor"), ((4, KV_HEADS), "tensor"), ((4, KV_HEADS), None)],
    ids=["tensor", "data-tensor", "data-tensor-whole-pool"],
)
def test_each_device_attends_over_its_own_heads(options, shape, heads_axis) -> None:
    """The kernel in a shard_map: over the heads (as under tensor parallelism), queries,
    pool and sinks (or ALiBi slopes) split over the tensor axis's 2 devices (GQA: each
    holds one key head and its 2 query heads), whole over a data axis; or, with no heads
    axis (a pool too few heads to split), whole on every device."""
    from jax.sharding import Mesh

    assert len(jax.devices()) >= 8, "needs XLA_FLAGS=--xla_force_host_platform_device_count=8 (conftest)"
    names = ("tensor",) if len(shape) == 1 else ("data", "tensor")
    mesh = Mesh(np.array(jax.devices()[: int(np.prod(shape))]).reshape(shape), names)
    split = compiled(per_device(SMALL_CHUNKS, mesh, heads_axis))
    run_step(*MIXED, seed=5, kernel=lambda *args, **given: split(*args, **given)[0], **options)


@pytest.mark.parametrize("heads_axis", ["tensor", None], ids=["heads-split", "heads-whole"])
def test_each_replica_writes_and_reads_its_own_part_of_the_pool(heads_axis) -> None:
    """``replica_axes``: two steps side by side, split over a data axis of 2 (as
    generate() splits a batch), each numbering its blocks, slots and requests in its own
    half of the pool (its own null block 0): each half's attention and pool after the
    write equal the kernel run on that step alone."""
    from jax.sharding import Mesh

    mesh = Mesh(np.array(jax.devices()[:4]).reshape(2, 2), ("data", "tensor"))
    steps = [random_step(*MIXED, seed=seed) for seed in (6, 7)]
    joined = [np.concatenate([getattr(step, name) for step in steps]) for name in ("query", "new_keys", "new_values", "pool")]
    batch = PagedBatch(*(jnp.concatenate(parts) for parts in zip(*(step.batch for step in steps))))
    options = {"scale": DIM**-0.5, "sliding_window": 5, "sinks": jnp.linspace(-1.0, 1.0, Q_HEADS)}
    split = compiled(per_device(SMALL_CHUNKS, mesh, heads_axis, replica_axes="data"))
    out, pool = split(jnp.asarray(joined[0]), jnp.asarray(joined[3]), batch, (jnp.asarray(joined[1]), jnp.asarray(joined[2])), **options)
    assert pool.sharding.shard_shape(pool.shape)[0] == BLOCKS
    for half, step in enumerate(steps):
        alone_out, alone_pool = attend(SMALL_CHUNKS, jnp.asarray(step.query), jnp.asarray(step.pool), step.batch,
                                       (jnp.asarray(step.new_keys), jnp.asarray(step.new_values)), **options)
        tokens = step.query.shape[0]
        np.testing.assert_allclose(np.asarray(out)[half * tokens:(half + 1) * tokens], alone_out, rtol=2e-5, atol=2e-5)
        np.testing.assert_array_equal(np.asarray(pool)[half * BLOCKS:(half + 1) * BLOCKS], alone_pool)


def test_the_pallas_arguments_give_jax_reference_ragged_attention_the_same_result() -> None:
    """What the Pallas path derives from a step (context lengths, query offsets, request
    count) fed to jax's own reference implementation of the kernel."""
    from jax.experimental.pallas.ops.tpu.ragged_paged_attention import ref_ragged_paged_attention

    def reference(query, pool, batch, *, scale, sliding_window, softcap):
        out = ref_ragged_paged_attention(
            query, pool, *ragged_arguments(batch), sm_scale=scale, sliding_window=sliding_window, soft_cap=softcap
        )
        return jnp.concatenate([out, jnp.zeros((query.shape[0] - out.shape[0], *out.shape[1:]), out.dtype)])

    run_step(*MIXED, seed=4, kernel=reference, sliding_window=5, softcap=2.0)


def test_the_pallas_kernel_matches_dense_attention_in_interpret_mode() -> None:
    """jax's Pallas ``ragged_paged_attention`` (the TPU kernel) on the same steps, run by
    Pallas' TPU interpreter on CPU; head_dim 128 as the kernel's lanes need."""
    from jax.experimental.pallas import tpu as pltpu

    try:
        with pltpu.force_tpu_interpret_mode():
            kernel = functools.partial(pallas_paged_attention, num_kv_pages_per_block=2, num_queries_per_block=8)
            run_step(*MIXED, seed=4, kernel=kernel, dim=128, sliding_window=5, softcap=2.0)
    except Exception as error:  # noqa: BLE001  reported as the reason of the skip
        if "ReshapeTransform" not in str(error):
            raise
        pytest.skip(
            "jax's TPU interpreter cannot run this kernel on CPU: the kernel reshapes a memory ref "
            f"(kv_ref.reshape), which the interpreter does not implement ({type(error).__name__}: "
            f"'ReshapeTransform' object has no attribute 'indices'; jax {jax.__version__})"
        )


@pytest.mark.parametrize("width", [1, 4, 16])
def test_query_blocks_hold_each_token_once_and_one_request_each(width: int) -> None:
    """Random splits of a step's tokens over its requests (some with none, padding
    last), all chosen or those of some requests only: each chosen token sits in exactly
    one real slot, the one ``slot_of_token`` names, of a block of its own request, at
    most ``width`` to a block, and no other token does."""
    rng = np.random.default_rng(width)
    blocks_of = jax.jit(query_blocks, static_argnums=1)  # one shape: 48 tokens, 8 requests
    requests, tokens = 8, 48
    draws = [np.full(requests, tokens // requests)]  # every token slot real: the most blocks
    draws += [rng.integers(0, 6, requests) * rng.integers(0, 2, requests) for _ in range(20)]  # some requests have none
    for counts, some in [(counts, some) for counts in draws for some in (False, True)]:
        real_tokens = int(counts.sum())
        rows = np.concatenate([np.repeat(np.arange(requests), counts), np.zeros(tokens - real_tokens, int)])
        positions = np.concatenate([np.arange(real_tokens), np.full(tokens - real_tokens, -1)])
        batch = PagedBatch(*(jnp.asarray(a, jnp.int32) for a in (positions, positions * 0, rows, np.zeros((requests, 1)))))
        chosen = (positions >= 0) & (rng.integers(0, 2, requests)[rows] == 1 if some else True)
        grid = jax.tree.map(np.asarray, blocks_of(batch, width, jnp.asarray(chosen)))
        held = grid.tokens[grid.real]
        assert sorted(held.tolist()) == np.flatnonzero(chosen).tolist()  # every chosen token once, no other
        assert (rows[grid.tokens] == grid.requests[:, None])[grid.real].all()  # a block's tokens are its request's
        slots = grid.slot_of_token[chosen]
        assert (grid.tokens.reshape(-1)[slots] == np.flatnonzero(chosen)).all() and grid.real.reshape(-1)[slots].all()


def test_context_reads_on_cpu_multiply_keys_first() -> None:
    """On CPU (only) the cached context's scores are computed keys first, behind an
    optimization barrier (XLA:CPU otherwise copied every gathered key block transposed);
    the numbers are checked against dense attention above."""
    step = random_step([5, 17], [1, 1], seed=0)
    kernel = jax.jit(functools.partial(SMALL_CHUNKS, scale=DIM**-0.5))
    program = kernel.lower(jnp.asarray(step.query), jnp.asarray(step.pool), step.batch).as_text()
    assert ("optimization_barrier" in program) == (jax.default_backend() == "cpu")
