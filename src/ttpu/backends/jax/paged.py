"""The paged model step (JAX backend): a stock transformers causal LM run over a flat,
ragged batch of tokens from many sequences, its attention writing new keys and values
into paged pools by slot and attending through block tables. The serving engine's runner
(:mod:`ttpu.serving.runner`) and ``generate()`` (:mod:`ttpu.backends.jax.decoder`) both
run this step.

The model is adapted through transformers' own seam: a "ttpu_paged" attention function is
registered with ``AttentionInterface`` (and no mask function, so transformers builds no
mask); while the step is traced the model's configs name it, and each attention call
writes its new keys and values into its pool by slot and attends through the block
tables (:mod:`ttpu.backends.jax.paged_attention`); a call given the keys and values
another made reads that one's pool.

Models with recurrent layers (SSM, linear attention, short convolutions; hybrids of them
and attention) keep, per sequence, one fixed-size state slot per such layer (vLLM's
hybrid cache). A recurrent layer mixes the tokens of its rows in order, so their steps
run the tokens as rows, one sequence per row (:class:`RowGrid`): new prompts (each
left-padded, from an empty state: padding then leaves the state exact) or decodes (one
token per row). The model sees transformers' own linear-attention cache layers over the
rows' states, gathered from their slots and written back after the step; attention
layers still go through the paged pools.

Models with sparse-attention indexers (DSA: DeepSeek-V3.2, GLM-MoE-DSA, ...) score each
query against every indexer key of its own sequence, then attend to the top-k positions
only. Each indexer keeps its keys in a paged pool of its own, numbered by the same block
tables as the attention's; their steps run in rows too, the model's cache handing each
row's whole sequence of indexer keys to its indexer, the model given each query's mask
over its row's positions, and the attention reading each query's top-k positions from
the pools (:func:`~ttpu.backends.jax.paged_attention.sparse_paged_attention`).

:class:`PagedModel` finds out, when it is built, whether the pools can carry a model
(:class:`NotPageable` says why not: no cache, a cache class of its own, positions
counted from the cache's length, attention outside the interface).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import inspect
import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import torch
from jax.sharding import Mesh, PartitionSpec as P
from transformers import AttentionInterface
from transformers.cache_utils import Cache, DynamicLayer

from ttpu.backends.base import CachedStepInputs
from ttpu.backends.jax.environment import to_traced
from ttpu.backends.jax.executables import Executables
from ttpu.backends.jax.kv_cache import (
    CONV, INDEXER, KEYS, RECURRENT, UNWRITTEN, VALUES, CacheLayout, LayerLayout, TracedLinearLayer,
)
from ttpu.backends.jax.paged_attention import PagedBatch, attend, paged_attention_kernel, per_device
from ttpu.backends.jax.torchax_compat import import_torchax
from ttpu.compat import DummyLayer
from ttpu.errors import InvalidArgumentError
from ttpu.inputs import positional_embeddings
from ttpu.patches.attention import POSITIONAL_ATTENTION
from ttpu.sharding.rules import Axis

PAGED_ATTENTION = "ttpu_paged"
PROBE_TOKENS = 16  # tokens of the traces that probe a model's attention calls

torchax = import_torchax()


class CacheArrays(NamedTuple):
    """What each step reads and writes (donated to it): the paged KV pools
    [num_blocks, block_size, 2 * kv_heads, dim] (paged_attention's layout), one per
    attention call that writes keys (most layers make one; a call given another's keys
    reads that one's pool), in the order of :class:`PagedModel`'s ``_pool_of``; and per layer its
    recurrent states by name [state slots + 1, ...] (empty without)."""

    pools: tuple[jax.Array, ...]
    states: tuple[dict[str, jax.Array], ...]
    indexers: tuple[jax.Array, ...] = ()  # per layer with an indexer: its keys' pool [num_blocks, block_size, dim]


Call = tuple[int, int]  # an attention call of a step: its layer, and its number among that layer's calls


class AttentionCall(NamedTuple):
    """What one attention call of a layer receives: key heads, key and value widths,
    dtype, sliding window, attention chunk and whether it positions tokens by ALiBi
    slopes (recorded by a probe trace, to size the pools)."""

    kv_heads: int
    key_dim: int
    value_dim: int
    dtype: str
    sliding_window: int | None
    attention_chunk: int | None
    alibi: bool
    reads: Call | None  # the call whose keys and values it was given, if another's (Gemma 3n's KV-shared layers)
    whole: bool  # its keys and values are the step's tokens' (as many as its queries)
    sparse: bool  # given an indexer's top-k positions (the sparse kernel reads every position from the pool)


@dataclass
class _Step:
    """What the attention layers of the step being traced read and write; a probe
    (``pools`` None) records each layer's calls instead."""

    pools: list[jax.Array] | None
    batch: PagedBatch | None
    mesh: Mesh | None = None
    heads_axes: tuple[str | None, ...] = ()  # per pool: the mesh axis its heads are split over
    grid: RowGrid | None = None  # rows of tokens, one request per row (models with recurrent state or indexers)
    new_rows: int | None = None  # the step's tokens are rows of this many, each a new prompt (attending within its row)
    replica_axes: Axis = None  # mesh axes the requests and the pools' blocks split over (a replica's own pool each)
    pool_of: Mapping[Call, int] = field(default_factory=dict)  # the pool each call that writes keys writes
    calls: dict[int, list[AttentionCall]] = field(default_factory=dict)
    calls_made: dict[int, int] = field(default_factory=dict)  # per layer, its calls so far in this trace
    # ids of the key and value tensors attended with: them (kept alive, so ids stay theirs), the arrays they
    # held then (an in-place change swaps those), and the call that first attended with them
    calls_of_kv: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor, tuple[Any, Any], Call]] = field(
        default_factory=dict)

    def call(self, layer: int, key: torch.Tensor, value: torch.Tensor) -> tuple[Call, Call]:
        """This call of ``layer`` (numbered among its calls) and the call that first
        attended with these ``key`` and ``value`` tensors, unchanged since (itself, if
        none did)."""
        self.calls_made[layer] = self.calls_made.get(layer, -1) + 1
        this = (layer, self.calls_made[layer])
        arrays = (torchax.interop.jax_view(key), torchax.interop.jax_view(value))
        seen = self.calls_of_kv.get((id(key), id(value)))
        if seen is not None and all(a is b for a, b in zip(seen[2], arrays)):
            return this, seen[3]
        self.calls_of_kv[(id(key), id(value))] = (key, value, arrays, this)
        return this, this


_current_step: contextvars.ContextVar[_Step] = contextvars.ContextVar("ttpu_paged_step")


def paged_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
    s_aux: torch.Tensor | None = None,
    alibi_slopes: torch.Tensor | None = None,
    indices: torch.Tensor | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers attention function over the step's paged pools; ``query``, ``key``,
    ``value`` are [rows, heads, length, dim]: one row of the step's tokens, or (with a
    grid) one row per request. ``alibi_slopes`` [heads] (from ALiBi models' patched
    attention modules) bias each score by the key's distance from the query.
    ``indices`` [rows, length, k] (a sparse-attention indexer's top-k positions, as
    transformers hands them to its sparse kernels) limit each query to those positions
    of its request."""
    step = _current_step.get()
    rows, length = query.shape[0], query.shape[2]
    q, k, v = (_tokens(x) for x in (query, key, value))  # [tokens, heads, dim], the batch's order
    chunk = _attention_chunk(module)
    this, source = step.call(module.layer_idx, key, value)  # source: another call's, if given its keys and values
    if step.pools is None:
        call = AttentionCall(k.shape[1], k.shape[2], v.shape[2], str(k.dtype), sliding_window, chunk,
                             alibi_slopes is not None, None if source == this else source,
                             k.shape[0] == q.shape[0] and v.shape[0] == q.shape[0], indices is not None)
        step.calls.setdefault(module.layer_idx, []).append(call)
        return to_traced(jnp.zeros((rows, length, q.shape[1], v.shape[2]), q.dtype)), None
    index = step.pool_of.get(source)
    if index is None:
        raise NotPageable(f"layer {module.layer_idx} makes an attention call the construction-time probe did not see")
    pool = step.pools[index]
    padded = functools.partial(_pad_last, size=pool.shape[-1])  # keys and values of unequal widths share the pool's
    written = (padded(k), padded(v)) if source == this else None  # a call given another's keys finds them written
    options: dict[str, Any] = {"scale": scaling if scaling is not None else q.shape[-1] ** -0.5}
    if sliding_window is not None:
        options["sliding_window"] = sliding_window
    if softcap is not None:
        options["softcap"] = softcap
    if s_aux is not None:
        options["sinks"] = torchax.interop.jax_view(s_aux)
    if alibi_slopes is not None:
        options["alibi_slopes"] = torchax.interop.jax_view(alibi_slopes)
    if chunk is not None:
        options["attention_chunk"] = chunk
    if indices is not None:  # read from the pool whatever the step (which holds the step's keys already)
        options["indices"] = torchax.interop.jax_view(indices).reshape(-1, indices.shape[-1])
        if step.grid is not None:
            options["row_width"] = length
    elif step.new_rows is not None:
        options["new_rows"] = step.new_rows
    kernel = paged_attention_kernel(options)
    if step.mesh is not None and step.mesh.size > 1:
        run = per_device(kernel, step.mesh, step.heads_axes[index], step.replica_axes)
    else:
        run = functools.partial(attend, kernel)
    out, step.pools[index] = run(padded(q), pool, step.batch, written, **options)
    out = out[..., : v.shape[-1]]
    return to_traced(out.reshape(rows, length, *out.shape[1:])), None


def _attention_chunk(module: torch.nn.Module) -> int | None:
    """The chunk size of a chunked-attention layer (Llama 4: ``layer_types`` names it,
    ``attention_chunk_size`` sizes it), else None."""
    config = getattr(module, "config", None)
    kinds = getattr(config, "layer_types", None) or []
    index = getattr(module, "layer_idx", None)
    if index is not None and index < len(kinds) and kinds[index] == "chunked_attention":
        return getattr(config, "attention_chunk_size", None)
    return None


def _tokens(x: torch.Tensor) -> jax.Array:
    """[rows, heads, length, dim] as the step's tokens [tokens, heads, dim], row after row (the batch's order)."""
    return jnp.swapaxes(torchax.interop.jax_view(x), 1, 2).reshape(-1, x.shape[1], x.shape[3])


def _pad_last(x: jax.Array, size: int) -> jax.Array:
    return x if x.shape[-1] == size else jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, size - x.shape[-1])])


AttentionInterface.register(PAGED_ATTENTION, paged_attention_forward)
POSITIONAL_ATTENTION.add(PAGED_ATTENTION)  # patched modules that compute attention themselves hand it theirs


@contextlib.contextmanager
def _paged_attention_named(module: torch.nn.Module) -> Iterator[None]:
    """Every config of ``module`` names the paged attention while a step is traced."""
    configs = {id(m.config): m.config for m in module.modules() if hasattr(m, "config")}
    before = {key: config._attn_implementation for key, config in configs.items()}
    try:
        for config in configs.values():
            config._attn_implementation = PAGED_ATTENTION
        yield
    finally:
        for key, config in configs.items():
            config._attn_implementation = before[key]


@contextlib.contextmanager
def _positions_fed(modules: list[torch.nn.Module], positions: jax.Array | None) -> Iterator[None]:
    """Each positional-embedding module of ``modules`` that takes position ids embeds
    ``positions`` (the step's tokens', [tokens]) in place of the ones its model numbered
    itself (from 0 or its cache's length, wrong for a flat batch of many requests);
    nothing without positions. (A model with a module that takes none is refused by
    :meth:`PagedModel._check_positions`, after the probe's trace.)"""
    modules = [m for m in modules if "position_ids" in inspect.signature(m.forward).parameters]
    if positions is None or not modules:
        yield
        return

    def feed(module: torch.nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
        return args, {**kwargs, "position_ids": to_traced(positions)}

    handles = [module.register_forward_pre_hook(feed, with_kwargs=True) for module in modules]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


class RowGrid(NamedTuple):
    """A step's tokens are rows, one request per row, in the batch's order (models with
    recurrent state or sparse-attention indexers): a step of new prompts, each
    left-padded in its row (padding at position -1), or of one decode per row."""

    state_slots: jax.Array  # [rows] each row's recurrent-state slot (0, padding's, for padding rows)


class NotPageable(Exception):
    """Why the paged cache cannot carry a model (the engine recomputes it instead)."""


def _served(layer: LayerLayout) -> bool:
    """Whether the engine keeps ``layer``'s cache: attention keys and values (and indexer
    keys), recurrent states, both, or nothing (a layer without attention or state, or one
    a text-only forward never writes, as cross-attention)."""
    kept = {n for n in layer.names if n.startswith((CONV, RECURRENT))} | {UNWRITTEN}
    return layer.names - kept in ({KEYS, VALUES}, {KEYS, VALUES, INDEXER}, frozenset())


class _PagedLayer(DynamicLayer):
    """An attention layer's cache in a step over rows: its keys and values go to the
    paged pool (the attention function writes them), so it hands them straight back."""

    def __init__(self) -> None:
        super().__init__()
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any):
        return key_states, value_states

    def get_seq_length(self) -> int:
        raise NotPageable(
            "the model reads its cache's length (for positions or masks), and the paged cache's requests each have "
            "their own"
        )


class _PagedIndexedLayer(_PagedLayer):
    """An attention layer with a sparse-attention indexer (DSA) in a step over rows: its
    new indexer keys go into its paged pool (``pool``, [num_blocks, block_size, dim]) at
    the tokens' slots, and it hands back each row's whole sequence of them, read through
    the row's block table: [rows, table positions, dim], position ``p`` at index ``p``
    (the step's mask hides those past each query's own). With ``replica_axes``, each
    replica does so for its own rows in its own part of the pool (numbered from its own
    null block, as the attention pools' are): no value crosses devices."""

    def __init__(self, pool: jax.Array, batch: PagedBatch, mesh: Mesh | None, replica_axes: Axis) -> None:
        super().__init__()
        self.pool, self._batch, self._mesh, self._replica_axes = pool, batch, mesh, replica_axes

    def update_indexer(self, indexer_key_states: torch.Tensor) -> torch.Tensor:
        run = _write_and_read_indexer
        if self._replica_axes is not None:
            split = P(self._replica_axes)
            run = jax.shard_map(run, mesh=self._mesh, in_specs=(split,) * 4, out_specs=(split, split), check_vma=False)
        keys = torchax.interop.jax_view(indexer_key_states)
        self.pool, context = run(self.pool, keys, self._batch.slots, self._batch.block_tables)
        return to_traced(context)


def _write_and_read_indexer(pool: jax.Array, keys: jax.Array, slots: jax.Array, tables: jax.Array):
    """``pool`` [blocks, block_size, dim] with the rows' new indexer ``keys`` [rows,
    length, dim] written at ``slots`` [rows * length], and each row's whole sequence of
    them [rows, table positions, dim] read through its row of block ``tables``."""
    blocks, block_size, dim = pool.shape
    pool = pool.at[slots // block_size, slots % block_size].set(keys.reshape(-1, dim).astype(pool.dtype))
    return pool, pool[tables].reshape(tables.shape[0], -1, dim)


class _PagedLinearLayer(TracedLinearLayer):
    """A recurrent layer beside paged attention layers: transformers 5.25 counts its
    length itself (and asks layer 0 for the cache's), but each request has its own."""

    get_seq_length = _PagedLayer.get_seq_length


class _PagedHybridLayer(_PagedLinearLayer, _PagedLayer):
    """A layer with recurrent states and attention (paged)."""

    def __init__(self, arrays: Mapping[str, torch.Tensor], layout: LayerLayout, empty: bool) -> None:
        _PagedLayer.__init__(self)
        TracedLinearLayer.__init__(self, arrays, layout, empty)


def _rows_cache(states: tuple[dict[str, jax.Array], ...], layout: CacheLayout, empty: bool,
                indexed: Mapping[int, _PagedIndexedLayer]) -> Cache:
    """transformers' cache over the rows' recurrent ``states`` (traced), attention layers
    paged (those with an indexer: ``indexed``, by layer), layers with neither
    transformers' dummy layer."""
    layers: list[Any] = []
    linear = _PagedLinearLayer if any(KEYS in layer.names for layer in layout.layers) else TracedLinearLayer
    for index, (arrays, layer) in enumerate(zip(states, layout.layers)):
        traced = {name: to_traced(a) for name, a in arrays.items()}
        attention = KEYS in layer.names
        if traced:
            layers.append(_PagedHybridLayer(traced, layer, empty) if attention else linear(traced, layer, empty))
        elif index in indexed:
            layers.append(indexed[index])
        else:
            layers.append(_PagedLayer() if attention else DummyLayer())
    return Cache(layers=layers)




class PagedModel:
    """One causal LM's paged step: the attention calls that keep pools, their shapes,
    and the traced step over them (:meth:`logits`). Building it raises
    :class:`NotPageable`, with the reason, for a model the pools cannot carry."""

    def __init__(self, forward: Any, module: torch.nn.Module, layout: CacheLayout) -> None:
        self._forward = forward
        self._module = module
        self._layout = layout
        self._step_inputs = CachedStepInputs(module)
        self._keeps_logits = "logits_to_keep" in inspect.signature(module.forward).parameters
        self._takes_positions = "position_ids" in inspect.signature(module.forward).parameters
        self._position_modules: list[torch.nn.Module] = []  # fed the step's positions (forwards without position_ids)
        name = type(module).__name__
        if not layout.layers or not all(_served(layer) for layer in layout.layers):
            raise NotPageable(
                f"the paged cache holds attention keys and values, recurrent states, both or nothing; "
                f"{name} has {layout.describe()}"
            )
        self._attention = [KEYS in layer.names for layer in layout.layers]
        self.has_states = any(layer.state_indices(CONV) or layer.state_indices(RECURRENT) for layer in layout.layers)
        self._indexers = {i: dict(layer.arrays)[INDEXER]  # each indexer layer's keys: [LENGTH, dim]
                          for i, layer in enumerate(layout.layers) if INDEXER in layer.names}
        if self.has_states and self._indexers:
            raise NotPageable(f"{name} has recurrent states and indexer keys, which no step over rows carries together")
        if any(self._attention) and not self._takes_positions:
            self._position_modules = positional_embeddings(module)
        found = Executables(self._probe, name="paged_step_probe", store=forward.program_store).output_shapes(
            forward.params, jax.ShapeDtypeStruct((1, PROBE_TOKENS), jnp.int32))
        outcome = json.loads(next(iter(found)))  # what the probe found (stored: a later process traces nothing)
        if "refused" in outcome:
            raise NotPageable(outcome["refused"])
        self._use_calls({int(layer): [AttentionCall(*c[:7], None if c[7] is None else tuple(c[7]), *c[8:]) for c in calls]
                         for layer, calls in outcome["calls"].items()})

    @property
    def positions_limit(self) -> int | None:
        """The length at or past which the step is not exact, if any: Llama 4's NoPE layers
        scale queries by positions counted from the cache's length (exact below ``floor_scale``)."""
        config = self._module.config.get_text_config(decoder=True)
        floor = getattr(config, "floor_scale", None)
        return floor if getattr(config, "attn_temperature_tuning", False) and floor else None

    @property
    def in_rows(self) -> bool:
        """Whether its steps run one request per row (:class:`RowGrid`): models with
        recurrent states, or with sparse-attention indexers (which score each query
        against its own request's keys)."""
        return self.has_states or bool(self._indexers)

    @property
    def caches_prefixes(self) -> bool:
        """Whether a row of its steps may start after positions its request already holds
        in the pools (a cached prefix): models stepped in rows for their indexers only,
        whose every attention call reads all its positions from the pools (the sparse
        kernel). A recurrent state is not kept per block, and a call attending within
        its row (a step of new prompts, ``new_rows``) would miss the prefix."""
        return bool(self._indexers) and not self.has_states and all(c.sparse for c in self._calls)

    @property
    def writers(self) -> list[Call]:
        """The attention calls that write keys and values, each into its own pool."""
        return list(self._pool_of)

    def _probe(self, params: Any, ids: jax.Array) -> dict[str, jax.Array]:
        """What a trace of the model with the paged attention finds, as the key of the
        output (so the program store keeps it): each layer's attention calls, or why the
        pools cannot carry the model."""
        try:
            calls = self._attention_calls(params, ids)
            self._check_positions(calls)
            self._use_calls(calls)
            if self.in_rows:
                self._check_step("one request per row")
            elif any(len(layer) > 1 for layer in calls.values()):  # calls the probe numbered must match a real step's
                self._check_step("paged")
            outcome: dict[str, Any] = {"calls": {str(layer): [list(c) for c in cs] for layer, cs in calls.items()}}
        except NotPageable as reason:
            outcome = {"refused": str(reason)}
        return {json.dumps(outcome, default=int): jnp.zeros((), jnp.int8)}

    def _check_positions(self, calls: dict[int, list[AttentionCall]]) -> None:
        """Refuse a model that numbers positions itself unless its positional embeddings
        can be given them (or it positions tokens by ALiBi slopes only, which the kernel
        applies by each token's position)."""
        if not any(self._attention) or self._takes_positions:
            return
        alibi_only = not self._position_modules and all(c.alibi for layer in calls.values() for c in layer)
        if not alibi_only and (
                self.in_rows or not self._position_modules
                or any("position_ids" not in inspect.signature(m.forward).parameters for m in self._position_modules)):
            raise NotPageable(
                f"{type(self._module).__name__}.forward takes no position_ids (it numbers positions itself, from 0 or "
                "its cache's length), and no positional-embedding module of it takes them instead"
            )

    def _use_calls(self, calls: dict[int, list[AttentionCall]]) -> None:
        """Keep the calls, and give each attention call that writes keys a pool."""
        self._calls = [call for layer in calls.values() for call in layer]
        writers = [(i, n) for i in sorted(calls) for n, call in enumerate(calls[i]) if call.reads is None]
        self._pools = [calls[i][n] for i, n in writers]
        self._pool_of = {call: index for index, call in enumerate(writers)}  # each call that writes keys: its pool
        plan = self._forward.placement.plan
        self._heads_axes = tuple(plan.kv_cache_spec((1, call.kv_heads, 1, 1))[1] for call in self._pools)

    def empty(self, num_blocks: int, block_size: int, state_slots: int, replica_axes: Axis = None) -> CacheArrays:
        """Zeroed pools of ``num_blocks`` blocks (block 0 is the null block padding writes
        into), as many for each indexer's keys, and recurrent states of ``state_slots``
        slots (slot 0 is padding's, besides). With ``replica_axes``, each pool's blocks
        split over those mesh axes: one pool of ``num_blocks / replicas`` blocks per
        replica, with its own null block."""
        place = self._forward.placement
        pools = tuple(self._pool(call, axis, num_blocks, block_size, replica_axes)
                      for call, axis in zip(self._pools, self._heads_axes))
        states = tuple(
            {n: jnp.zeros((state_slots + 1, *a.shape), a.dtype, device=place.replicated)
             for n, a in layer.arrays if n.startswith((CONV, RECURRENT))}
            for layer in self._layout.layers
        )
        spec = (replica_axes,) if replica_axes else ()
        indexers = tuple(jnp.zeros((num_blocks, block_size, a.shape[-1]), a.dtype, device=place.sharding(spec))
                         for a in self._indexers.values())
        return CacheArrays(pools, states, indexers)

    def _pool(self, call: AttentionCall, heads_axis: str | None, num_blocks: int, block_size: int,
              replica_axes: Axis) -> jax.Array:
        """One attention call's zeroed pool, [num_blocks, block_size, 2 * kv_heads, head_dim]
        for the keys and values it receives (the wider width if they differ), its heads
        split over the tensor axis as ``generate``'s dense cache's are, its blocks over
        ``replica_axes``."""
        shape = (num_blocks, block_size, 2 * call.kv_heads, max(call.key_dim, call.value_dim))
        # Spelled as the step's outputs come back (no trailing Nones), so the donated pools keep one signature.
        spec = (replica_axes, None, heads_axis) if heads_axis else (replica_axes,) if replica_axes else ()
        return jnp.zeros(shape, call.dtype, device=self._forward.placement.sharding(spec))

    def logits(self, params: Any, cache: CacheArrays, ids: jax.Array, batch: PagedBatch,
               sampling_rows: jax.Array | None, grid: RowGrid | None,
               embedded: jax.Array | None = None, new_rows: int | None = None,
               replica_axes: Axis = None) -> tuple[CacheArrays, jax.Array]:
        """Inside a trace: the cache after the step's tokens ``ids`` [tokens] (where
        ``batch`` places them) and the logits [sampling tokens, vocab] of the tokens at
        ``sampling_rows`` (indices into the whole step's tokens; None: every token; with a
        ``grid``, the last token of the row each names, each row's last token for None).
        ``embedded`` [tokens], if given, are the positions that models numbering positions
        themselves embed (transformers counts left padding there), in place of the tokens'.
        With ``new_rows``, the tokens are rows of that many, each one request's whole
        prompt (padding anywhere in it): each row attends within itself only, densely (a
        ``grid``'s rows of more than one token are such rows; for an indexer model's, which
        may start after computed positions, its calls read those from the pools). With ``replica_axes``, the
        tokens and requests split over those mesh axes as the pools' blocks do
        (:meth:`empty`): each replica's requests number its own blocks, and their rows in
        ``batch`` count from 0 in each replica."""
        if grid is not None:  # rows of whole new prompts, or of one decode each
            length = ids.shape[0] // grid.state_slots.shape[0]
            new_rows = length if length > 1 else None
        place = self._forward.placement
        if replica_axes is not None:  # the whole forward splits with its tokens, not only the attention
            ids = jax.lax.with_sharding_constraint(ids, place.sharding((replica_axes,)))
        step = _Step(list(cache.pools), batch, place.mesh, self._heads_axes, grid, new_rows, replica_axes,
                     self._pool_of)
        if grid is not None:
            logits, states, indexers = self._rows_traced(step, params, cache, ids)
            if sampling_rows is not None:  # the rows whose last tokens sample (a prompt chunk short of its end does not)
                logits = logits[sampling_rows // (ids.shape[0] // grid.state_slots.shape[0])]
            return CacheArrays(tuple(step.pools), states, indexers), logits
        inputs = {"input_ids": to_traced(ids[None]), "use_cache": False}
        if self._keeps_logits and sampling_rows is not None:  # the vocabulary projection of the sampling tokens only
            inputs["logits_to_keep"] = to_traced(sampling_rows)
        logits = self._logits_traced(step, params, inputs, jnp.maximum(batch.positions, 0), embedded)[0]
        logits = logits if self._keeps_logits or sampling_rows is None else logits[sampling_rows]
        return CacheArrays(tuple(step.pools), cache.states, cache.indexers), logits

    def _check_step(self, how: str) -> None:
        """Trace (not compile) a step of new prompts and one of decodes, so that a model
        whose layers this way of stepping cannot carry is refused now, not in its first step."""
        cache = jax.eval_shape(functools.partial(self.empty, 2, PROBE_TOKENS, 1))
        for tokens, rows in ((PROBE_TOKENS, 1), (1, 1)):
            positions = np.full(tokens, -1, np.int32)
            zeros = np.zeros(tokens, np.int32)
            batch = PagedBatch(positions, zeros, zeros, np.zeros((rows, 1), np.int32))
            grid = RowGrid(np.zeros(rows, np.int32)) if self.in_rows else None
            message = trace_error(self.logits, self._forward.params, cache, zeros, batch, np.zeros(rows, np.int32), grid)
            if message is not None:
                raise NotPageable(f"{type(self._module).__name__} fails {how} ({message})")

    def _attention_calls(self, params: Any, ids: jax.Array) -> dict[int, list[AttentionCall]]:
        """Each attention layer's calls, from a trace of one step with a probe in place of
        the paged attention; refuses the models whose attention the engine would get
        wrong (not through the interface, keys from a layer that caches none or a caching
        layer given another's, keys other than the step's tokens', a window kept only in
        a mask)."""
        module, attention = self._module, self._attention
        name = type(module).__name__
        step = _Step(None, None)
        try:
            inputs = {"input_ids": to_traced(ids), "use_cache": False}
            if self._indexers:  # their indexers index a mask transformers builds none of for the paged attention
                inputs["attention_mask"] = to_traced(jnp.tril(jnp.ones((1, 1, ids.shape[1], ids.shape[1]), bool)))
            self._logits_traced(step, params, inputs, ids[0] * 0 if any(attention) else None)
        except Exception as error:  # noqa: BLE001  the model's own code raised: say which and why
            raise NotPageable(
                f"{name} does not run with the paged attention ({type(error).__name__}: "
                f"{str(error).splitlines()[0][:300]}); its attention likely computes scores itself instead of "
                "calling transformers' AttentionInterface"
            ) from None  # the message carries the model's error; its trace is not the caller's concern
        problems = [f"layer {i} never calls transformers' attention function"
                    for i, cached in enumerate(attention) if cached and i not in step.calls]
        problems += [f"layer {i} calls attention but caches no keys" for i, calls in step.calls.items()
                     if not attention[i] and any(c.reads is None or not attention[c.reads[0]] for c in calls)]
        problems += [f"layer {i} caches keys but attends with another layer's" for i, calls in step.calls.items()
                     if attention[i] and any(c.reads is not None and c.reads[0] != i for c in calls)]
        problems += [f"layer {i} attends over keys other than its tokens'" for i, calls in step.calls.items()
                     if not all(c.whole for c in calls)]
        config = module.config.get_text_config(decoder=True)
        kinds = getattr(config, "layer_types", None) or getattr(config, "attention_layers", None) or []
        problems += [
            f"layer {i} is {kind!r} attention, whose window reaches attention only through a mask"
            for i, kind in enumerate(kinds)
            if kind not in ("full_attention", "global", "attention", "hybrid", "indexed_attention") and i in step.calls
            and any(c.sliding_window is None and c.attention_chunk is None for c in step.calls[i])
        ]
        if problems:
            raise NotPageable(
                f"the paged attention cannot run {name}: {'; '.join(problems[:3])}. It runs models whose every layer "
                "attends through transformers' AttentionInterface"
            )
        return step.calls

    def _rows_traced(self, step: _Step, params: Any, arrays: CacheArrays, ids: jax.Array):
        """The logits [rows, vocab] of each row's last token, the state slots and the
        indexers' pools after the rows ran: new prompts start from empty states, decodes
        from their slots'. With indexers, the model is given each query's mask over its
        row's positions ([rows, 1, length, table positions]) in place of transformers'
        (built from a cache length the rows do not share)."""
        grid = step.grid
        rows = grid.state_slots.shape[0]
        length = ids.shape[0] // rows
        states = arrays.states

        positions = step.batch.positions.reshape(rows, length)
        empty = length > 1  # prompts are scheduled whole (decodes are one token)
        before = tuple(
            {n: jnp.zeros((rows, *a.shape[1:]), a.dtype) if empty else a[grid.state_slots] for n, a in layer.items()}
            for layer in states
        )
        indexed = {i: _PagedIndexedLayer(pool, step.batch, step.mesh, step.replica_axes)
                   for i, pool in zip(self._indexers, arrays.indexers)}
        cache = _rows_cache(before, self._layout, empty, indexed)
        if indexed:  # [rows, 1, length, table positions]: each query sees its row's positions up to its own
            keys = jnp.arange(step.batch.block_tables.shape[1] * arrays.indexers[0].shape[1])
            mask = ((keys <= positions[..., None]) & (positions >= 0)[..., None])[:, None]
        else:
            mask = (positions >= 0).astype(jnp.int32)  # recurrent layers zero a prompt's padding (a decode has none)
        inputs = self._step_inputs(to_traced(ids.reshape(rows, length)), to_traced(mask), cache,
                                   to_traced(jnp.maximum(positions, 0)))
        logits = self._logits_traced(step, params, inputs)[:, -1]
        after = [layer.linear_arrays() if isinstance(layer, TracedLinearLayer) else {} for layer in cache.layers]
        written = grid.state_slots > 0  # padding rows' states go nowhere
        replicated = self._forward.placement.replicated  # as the slots were made: one program per bucket
        states = tuple(
            {n: jax.lax.with_sharding_constraint(a.at[jnp.where(written, grid.state_slots, a.shape[0])].set(after[i][n].jax(), mode="drop"), replicated)
             for n, a in layer.items()}
            for i, layer in enumerate(states)
        )
        spec = self._forward.placement.sharding((step.replica_axes,) if step.replica_axes else ())
        indexers = tuple(jax.lax.with_sharding_constraint(layer.pool, spec) for layer in indexed.values())
        return logits, states, indexers

    def _logits_traced(self, step: _Step, params: Any, inputs: dict[str, Any], positions: jax.Array | None = None,
                       embedded: jax.Array | None = None) -> jax.Array:
        """The model's logits on ``inputs`` inside a trace, its attention layers reading
        and writing ``step``; ``positions`` ([tokens], one row) are its tokens' position
        ids, given to the forward or, if it takes none, to its positional embeddings."""
        if positions is not None and self._takes_positions:
            inputs = {**inputs, "position_ids": to_traced(positions[None])}
        fed = None
        if positions is not None and self._position_modules:
            fed = positions if embedded is None else embedded
        token = _current_step.set(step)
        try:
            with _paged_attention_named(self._module), _positions_fed(self._position_modules, fed):
                return self._forward.call_traced(params, inputs).logits.jax()
        finally:
            _current_step.reset(token)



def trace_error(function: Any, *args: Any) -> str | None:
    """Why tracing ``function`` on ``args`` (arrays or shapes) fails, in a line (the
    model's own error, or what this module refused), or None if it traces."""
    try:
        jax.eval_shape(function, *args)
    except Exception as error:  # noqa: BLE001  the model's own code raised: say which and why
        cause = error.__cause__ if isinstance(error.__cause__, (InvalidArgumentError, NotPageable)) else error
        message = str(cause).splitlines()[0][:300]
        return message if isinstance(cause, NotPageable) else f"{type(cause).__name__}: {message}"
    return None


