"""The engine's model runner (JAX backend): one compiled step runs a stock transformers
model over a flat, ragged batch of tokens from many requests, reading and writing a
paged KV pool, and returns the logits of the tokens that sample.

The model is adapted through transformers' own seam: a "ttpu_paged" attention function is
registered with ``AttentionInterface`` (and no mask function, so transformers builds no
mask); while the step is traced the model's configs name it, and each attention call
writes its new keys and values into its pool by slot and attends through the block
tables (:mod:`ttpu.serving.paged_attention`); a call given the keys and values another
made reads that one's pool. The pools are donated to each step.
Steps are padded to buckets of tokens and of requests (powers of two), so a running
engine compiles one program per bucket pair.

Models with recurrent layers (SSM, linear attention, short convolutions; hybrids of them
and attention) keep, per running request, one fixed-size state slot per such layer
(vLLM's hybrid cache). A recurrent layer mixes the tokens of its rows in order, so their
steps run the tokens as rows, one request per row, ``[requests, length]``: a step of new
prompts (each left-padded, from an empty state: padding then leaves the state exact) or a
step of decodes (``length`` 1). The model sees transformers' own linear-attention cache
layers over the rows' states, gathered from their slots and written back after the step;
attention layers still go through the paged pools.

Models whose cache or attention the paged pools cannot hold (no cache, a cache class of
their own, indexer keys, positions counted from the cache's length, attention outside the
interface) are found at construction and recomputed instead: each step runs its requests'
whole sequences, one per row, through the model's uncached forward.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import inspect
import logging
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import torch
from jax.sharding import Mesh
from transformers import AttentionInterface
from transformers.cache_utils import Cache, DynamicLayer

from ttpu.backends.base import CachedStepInputs
from ttpu.backends.jax.environment import to_traced
from ttpu.backends.jax.executables import Executables
from ttpu.backends.jax.kv_cache import (
    CONV, KEYS, RECURRENT, UNWRITTEN, VALUES, CacheLayout, LayerLayout, TracedLinearLayer,
)
from ttpu.backends.jax.torchax_compat import import_torchax
from ttpu.compat import DummyLayer
from ttpu.errors import InvalidArgumentError
from ttpu.inputs import positional_embeddings
from ttpu.patches.attention import POSITIONAL_ATTENTION
from ttpu.serving.paged_attention import PagedBatch, paged_attention_kernel, split_over_heads, write_kv
from ttpu.serving.scheduler import SchedulerOutput

logger = logging.getLogger(__name__)

PAGED_ATTENTION = "ttpu_paged"
MIN_TOKEN_BUCKET, MIN_REQUEST_BUCKET = 16, 8

torchax = import_torchax()


class CacheArrays(NamedTuple):
    """What each step reads and writes (donated to it): the paged KV pools
    [num_blocks, block_size, 2 * kv_heads, dim] (paged_attention's layout), one per
    attention call that writes keys (most layers make one; a call given another's keys
    reads that one's pool), in the order of the runner's ``pool_of``; and per layer its
    recurrent states by name [state slots + 1, ...] (empty without)."""

    pools: tuple[jax.Array, ...]
    states: tuple[dict[str, jax.Array], ...]


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


@dataclass
class _Step:
    """What the attention layers of the step being traced read and write; a probe
    (``pools`` None) records each layer's calls instead."""

    pools: list[jax.Array] | None
    batch: PagedBatch | None
    mesh: Mesh | None = None
    heads_axes: tuple[str | None, ...] = ()  # per pool: the mesh axis its heads are split over
    grid: RowGrid | None = None  # rows of tokens (models with recurrent state): where each token sits
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
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers attention function over the step's paged pools; ``query``, ``key``,
    ``value`` are [rows, heads, length, dim]: one row of the step's tokens, or (with a
    grid) one row per request. ``alibi_slopes`` [heads] (from ALiBi models' patched
    attention modules) bias each score by the key's distance from the query."""
    step = _current_step.get()
    rows, length = query.shape[0], query.shape[2]
    q, k, v = (_tokens(x, step.grid) for x in (query, key, value))  # [tokens, heads, dim], the batch's order
    chunk = _attention_chunk(module)
    this, source = step.call(module.layer_idx, key, value)  # source: another call's, if given its keys and values
    if step.pools is None:
        call = AttentionCall(k.shape[1], k.shape[2], v.shape[2], str(k.dtype), sliding_window, chunk,
                             alibi_slopes is not None, None if source == this else source,
                             k.shape[0] == q.shape[0] and v.shape[0] == q.shape[0])
        step.calls.setdefault(module.layer_idx, []).append(call)
        return to_traced(jnp.zeros((rows, length, q.shape[1], v.shape[2]), q.dtype)), None
    index = step.pool_of.get(source)
    if index is None:
        raise _NotPageable(f"layer {module.layer_idx} makes an attention call the construction-time probe did not see")
    pool = step.pools[index]
    padded = functools.partial(_pad_last, size=pool.shape[-1])  # keys and values of unequal widths share the pool's
    if source == this:  # a call given another's keys finds them written there
        pool = write_kv(pool, padded(k), padded(v), step.batch.slots)
        step.pools[index] = pool
    options = {"scale": scaling if scaling is not None else q.shape[-1] ** -0.5, "sliding_window": sliding_window,
               "softcap": softcap}
    if s_aux is not None:
        options["sinks"] = torchax.interop.jax_view(s_aux)
    if alibi_slopes is not None:
        options["alibi_slopes"] = torchax.interop.jax_view(alibi_slopes)
    if chunk is not None:
        options["attention_chunk"] = chunk
    kernel = paged_attention_kernel(options)
    if step.heads_axes[index] is not None:
        kernel = split_over_heads(kernel, step.mesh, step.heads_axes[index])
    out = kernel(padded(q), pool, step.batch, **options)[..., : v.shape[-1]]
    if step.grid is not None:
        out = out[step.grid.tokens_of_cells]
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


def _tokens(x: torch.Tensor, grid: RowGrid | None) -> jax.Array:
    """[rows, heads, length, dim] as the step's tokens [tokens, heads, dim], in its batch's order."""
    tokens = jnp.swapaxes(torchax.interop.jax_view(x), 1, 2).reshape(-1, x.shape[1], x.shape[3])
    return tokens if grid is None else tokens[grid.cells]


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
    """Each positional-embedding module of ``modules`` embeds ``positions`` (the step's
    tokens', [tokens]) in place of the ones its model numbered itself (from 0 or its
    cache's length, wrong for a flat batch of many requests); nothing without positions."""
    if positions is None:
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


def bucket(count: int, smallest: int, largest: int) -> int:
    """The power of two from ``smallest`` that holds ``count`` (at most ``largest``)."""
    size = smallest
    while size < count:
        size *= 2
    return min(size, max(largest, count))


class RowGrid(NamedTuple):
    """A step's tokens as rows, one request per row, left-padded (models with recurrent
    state); the step's :class:`PagedBatch` keeps the flat order the attention kernels
    take (each request's tokens together, padding last)."""

    cells: jax.Array  # [tokens] the grid cell (row * length + column) of each token of the batch
    tokens_of_cells: jax.Array  # [tokens] the batch's token at each grid cell (the inverse)
    state_slots: jax.Array  # [rows] each row's recurrent-state slot (0, padding's, for padding rows)


@dataclass(frozen=True)
class StepInputs:
    """One step's padded host arrays; ``sampling_rows[i]`` is the token whose logits
    pick request ``sampling_ids[i]``'s next token (with a ``grid`` it goes unused: row
    ``i``'s last token picks it)."""

    ids: np.ndarray
    positions: np.ndarray
    batch: PagedBatch
    sampling_rows: np.ndarray
    sampling_ids: list[str]
    grid: RowGrid | None = None


class ModelRunner:
    """The paged KV pools (and recurrent state slots) of one model and its compiled step."""

    def __init__(self, model: Any, layout: CacheLayout, num_blocks: int, block_size: int, max_model_len: int,
                 max_num_batched_tokens: int, max_num_seqs: int) -> None:
        self._model = model
        self._layout = layout
        self._forward = model.compiled_forward
        self._step_inputs = CachedStepInputs(model.torch_module)
        self._keeps_logits = "logits_to_keep" in inspect.signature(model.torch_module.forward).parameters
        self._takes_positions = "position_ids" in inspect.signature(model.torch_module.forward).parameters
        self._position_modules: list[torch.nn.Module] = []  # fed the step's positions (forwards without position_ids)
        self.block_size = block_size
        self.blocks_per_request = -(-max_model_len // block_size)
        self.max_model_len = max_model_len
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_num_seqs = max_num_seqs
        self.has_states = False
        self.state_slots = 0
        self.recompute_reason: str | None = None  # why the paged cache cannot hold the model, if it cannot
        try:
            self._page(num_blocks)
        except _NotPageable as reason:
            self.recompute_reason = str(reason)
            self._recompute()
        self._step = Executables(self._step_program, static_argnums=(6,), donate_argnums=(1,), name="serving_step",
                                 store=self._forward.program_store, background_warm_up=False)

    @property
    def whole_prompts(self) -> bool:
        """Whether steps run one request per row, so prompts are prefilled whole, in steps
        of their own (recurrent states; recomputed sequences)."""
        return self.has_states or self.recompute_reason is not None

    def _page(self, num_blocks: int) -> None:
        """Build the paged pools and state slots; raise :class:`_NotPageable` (with the
        reason) for a model whose cache or attention they cannot carry."""
        layout, name = self._layout, type(self._model.torch_module).__name__
        if layout.recompute or not all(_served(layer) for layer in layout.layers):
            raise _NotPageable(
                f"the paged cache holds attention keys and values, recurrent states, both or nothing; "
                f"{name} has {layout.describe()}"
            )
        attention = [KEYS in layer.names for layer in layout.layers]
        self.has_states = any(layer.state_indices(CONV) or layer.state_indices(RECURRENT) for layer in layout.layers)
        calls = self._attention_calls(attention)
        if any(attention) and not self._takes_positions:
            self._position_modules = positional_embeddings(self._model.torch_module)
            # ALiBi models position tokens only in their attention, which the kernel does by each token's position.
            alibi_only = not self._position_modules and all(c.alibi for layer in calls.values() for c in layer)
            if not alibi_only and (
                    self.has_states or not self._position_modules
                    or any("position_ids" not in inspect.signature(m.forward).parameters for m in self._position_modules)):
                raise _NotPageable(
                    f"{name}.forward takes no position_ids (it numbers positions itself, from 0 or its cache's length), "
                    "and no positional-embedding module of it takes them instead"
                )
        self.state_slots = self.max_num_seqs if self.has_states else 0  # one per seat, besides padding's slot 0
        place = self._forward.placement

        writers = [(i, n) for i in sorted(calls) for n, call in enumerate(calls[i]) if call.reads is None]
        self._pool_of = {call: index for index, call in enumerate(writers)}  # each call that writes keys: its pool

        def empty() -> CacheArrays:
            pools = tuple(self._pool(calls[i][n], num_blocks) for i, n in self._pool_of)
            states = tuple(
                {n: jnp.zeros((self.state_slots + 1, *a.shape), a.dtype, device=place.replicated)
                 for n, a in layer.arrays if n.startswith((CONV, RECURRENT))}
                for layer in layout.layers
            )
            return CacheArrays(pools, states)

        self._empty = empty
        self.cache = empty()
        self._heads_axes = tuple(pool.sharding.spec[2] if pool.sharding.spec else None for pool in self.cache.pools)
        if self.has_states:
            self._trace_step("one request per row")
        elif any(len(layer) > 1 for layer in calls.values()):  # calls the probe numbered must match a real step's
            self._trace_step("paged")

    def _recompute(self) -> None:
        """No cache at all: every step runs each of its requests' whole sequences (the
        way ``generate`` runs a model that keeps no cache), so every causal LM is served."""
        layers = len(self._layout.layers)
        self.has_states, self.state_slots, self._position_modules = False, 0, []
        self._pool_of = {}
        self._empty = lambda: CacheArrays((), ({},) * layers)
        self.cache = self._empty()
        self._heads_axes = ()
        self._trace_step("recomputing whole sequences")
        logger.warning(
            "the serving engine recomputes each request's whole sequence at every step for %s (no KV cache, "
            "O(length) per token): %s", type(self._model.torch_module).__name__, self.recompute_reason,
        )

    def _trace_step(self, how: str) -> None:
        """Trace (not compile) a step of new prompts and one of decodes, so that a model
        whose layers this way of stepping cannot carry is refused now, not in its first step."""
        for tokens, requests in ((MIN_TOKEN_BUCKET, 1), (MIN_REQUEST_BUCKET, MIN_REQUEST_BUCKET)):
            inputs = self.empty_step(tokens, requests)
            try:
                jax.eval_shape(functools.partial(self._step_program, logits_rows=self.sampled_rows(requests)),
                               self._forward.params,
                               self.cache, inputs.ids, inputs.batch, inputs.sampling_rows, inputs.grid)
            except Exception as error:  # noqa: BLE001  the model's own code raised: say which and why
                cause = error.__cause__ if isinstance(error.__cause__, (InvalidArgumentError, _NotPageable)) else error
                message = str(cause).splitlines()[0][:300]
                if not isinstance(cause, _NotPageable):
                    message = f"{type(cause).__name__}: {message}"
                if self.recompute_reason is None:  # paging failed: recompute instead
                    raise _NotPageable(f"{type(self._model.torch_module).__name__} fails {how} ({message})") from None
                raise InvalidArgumentError(
                    f"the serving engine cannot run {type(self._model.torch_module).__name__} {how} ({message}); "
                    f"it cannot page its cache either ({self.recompute_reason})"
                ) from None

    @property
    def compile_count(self) -> int:
        return len(self._step)

    def cache_lost(self) -> bool:
        """Whether a failed step took the (donated) cache arrays with it."""
        return any(array.is_deleted() for array in jax.tree.leaves(self.cache))

    def reset_cache(self) -> None:
        """Empty cache arrays in place of lost ones."""
        self.cache = self._empty()

    def _attention_calls(self, attention: list[bool]) -> dict[int, list[AttentionCall]]:
        """Each attention layer's calls, from a trace of one step with a probe in place of
        the paged attention; refuses the models whose attention the engine would get
        wrong (not through the interface, keys from a layer that caches none or a caching
        layer given another's, keys other than the step's tokens', a window kept only in
        a mask, Llama 4's temperature tuning at or past ``floor_scale``)."""
        module = self._model.torch_module
        name = type(module).__name__
        step = _Step(None, None)

        def probe(params: Any, ids: jax.Array) -> jax.Array:
            inputs = {"input_ids": to_traced(ids), "use_cache": False}
            return self._logits_traced(step, params, inputs, ids[0] * 0 if any(attention) else None)

        try:
            jax.eval_shape(probe, self._forward.params, jax.ShapeDtypeStruct((1, MIN_TOKEN_BUCKET), jnp.int32))
        except Exception as error:  # noqa: BLE001  the model's own code raised: say which and why
            raise _NotPageable(
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
            if kind not in ("full_attention", "global", "attention", "hybrid") and i in step.calls
            and any(c.sliding_window is None and c.attention_chunk is None for c in step.calls[i])
        ]
        floor = getattr(config, "floor_scale", None)
        if getattr(config, "attn_temperature_tuning", False) and floor and max(self.max_model_len, self.max_num_batched_tokens) >= floor:
            problems.append(  # Llama 4's NoPE layers scale queries by positions counted from the cache's length
                f"its attention temperature tuning counts positions from the cache, exact only below floor_scale={floor} "
                f"(lower max_model_len and max_num_batched_tokens below it)"
            )
        if problems:
            raise _NotPageable(
                f"the paged attention cannot run {name}: {'; '.join(problems[:3])}. It runs models whose every layer "
                "attends through transformers' AttentionInterface"
            )
        return step.calls

    def _pool(self, call: AttentionCall, num_blocks: int) -> jax.Array:
        """One attention call's zeroed pool, [num_blocks, block_size, 2 * kv_heads, head_dim]
        for the keys and values it receives (the wider width if they
        differ), its heads split over the tensor axis as ``generate``'s cache's are (the
        pool is shared by all requests: never split by batch)."""
        heads, dim = call.kv_heads, max(call.key_dim, call.value_dim)
        place = self._forward.placement
        heads_axis = place.plan.kv_cache_spec((1, heads, num_blocks * self.block_size, dim))[1]
        shape = (num_blocks, self.block_size, 2 * heads, dim)
        # Spelled as the step's outputs come back (no trailing Nones), so the donated pools keep one signature.
        spec = (None, None, heads_axis) if heads_axis else ()
        return jnp.zeros(shape, call.dtype, device=place.sharding(spec))

    def buckets(self) -> list[tuple[int, int]]:
        """Every (token, request) bucket pair a step can be padded to. In one row: ``r``
        requests scheduled means at least ``r`` tokens, so a pair needs ``tokens >`` half
        of ``requests``. In rows: decodes (one token per row), and new prompts padded to
        a length whose rows the scheduler fits in the token budget. Recomputed: the same
        rows of whole sequences, for new prompts and decodes alike."""
        if self.recompute_reason is not None:
            return [(rows * length, rows) for length in _powers(MIN_TOKEN_BUCKET, self.max_model_len)
                    for rows in _powers(1, self.max_num_seqs)
                    if rows == 1 or rows * length <= self.max_num_batched_tokens]
        if not self.has_states:
            tokens = _powers(MIN_TOKEN_BUCKET, self.max_num_batched_tokens)
            requests = _powers(MIN_REQUEST_BUCKET, self.max_num_seqs)
            least = functools.partial(bucket, smallest=MIN_TOKEN_BUCKET, largest=self.max_num_batched_tokens)
            return [(t, r) for t in tokens for r in requests if t >= least(r // 2 + 1)]
        pairs = [(rows, rows) for rows in _powers(MIN_REQUEST_BUCKET, self.max_num_seqs)]
        for length in _powers(MIN_TOKEN_BUCKET, self.max_model_len):
            pairs += [(rows * length, rows) for rows in _powers(1, self.max_num_seqs)
                      if rows == 1 or rows * length <= self.max_num_batched_tokens]
        return pairs

    def prefill_tokens(self, prompts: int, longest: int) -> int:
        """The tokens of a step of ``prompts`` whole new prompts, the longest ``longest``
        tokens, padded to its rows (models with recurrent state: the scheduler keeps them
        within the budget)."""
        return bucket(prompts, 1, self.max_num_seqs) * bucket(longest, MIN_TOKEN_BUCKET, self.max_model_len)

    def empty_step(self, tokens: int, requests: int) -> StepInputs:
        """A step of padding only (it writes the null block and state slot), to compile a bucket pair."""
        positions = np.full(tokens, -1, np.int32)
        zeros = np.zeros(tokens, np.int32)
        tables = np.zeros((requests, self.blocks_per_request), np.int32)
        batch = PagedBatch(positions, zeros, zeros, tables)
        grid = None
        if self.has_states:
            cells = np.arange(tokens, dtype=np.int32)
            grid = RowGrid(cells, cells, np.zeros(requests, np.int32))
        return StepInputs(np.zeros(tokens, np.int32), positions, batch, np.zeros(requests, np.int32), [], grid)

    def prepare(self, out: SchedulerOutput, block_ids: Mapping[str, list[int]],
                state_slots: Mapping[str, int]) -> StepInputs:
        """The scheduled chunks as padded arrays (tokens and requests rounded up to
        buckets); for a model with recurrent state, also as rows over the requests'
        ``state_slots`` (request id -> slot; unread otherwise)."""
        if self.recompute_reason is not None:
            return self._sequences(out)
        if not self.has_states:
            tokens = bucket(out.num_tokens, MIN_TOKEN_BUCKET, self.max_num_batched_tokens)
            return self._flat(out, block_ids, tokens, bucket(len(out.chunks), MIN_REQUEST_BUCKET, self.max_num_seqs))
        decodes = all(chunk.start > 0 and chunk.count == 1 for chunk in out.chunks)
        if not decodes and not all(c.start == 0 and c.count == c.request.num_tokens for c in out.chunks):
            raise InvalidArgumentError("a step over rows is either whole new prompts or one decode token per request")
        if decodes:
            length, rows = 1, bucket(len(out.chunks), MIN_REQUEST_BUCKET, self.max_num_seqs)
        else:
            length = bucket(max(c.count for c in out.chunks), MIN_TOKEN_BUCKET, self.max_model_len)
            rows = bucket(len(out.chunks), 1, self.max_num_seqs)
        inputs = self._flat(out, block_ids, rows * length, rows)
        cells, at = np.zeros(rows * length, np.int32), 0
        for row, chunk in enumerate(out.chunks):  # each row's tokens at its end: left padding
            cells[at : at + chunk.count] = row * length + length - chunk.count + np.arange(chunk.count)
            at += chunk.count
        free = np.ones(rows * length, bool)
        free[cells[:at]] = False
        cells[at:] = np.flatnonzero(free)  # the padding tokens fill the other cells
        slots = np.zeros(rows, np.int32)
        slots[: len(out.chunks)] = [state_slots[chunk.request.id] for chunk in out.chunks]
        return dataclasses.replace(inputs, grid=RowGrid(cells, np.argsort(cells).astype(np.int32), slots))

    def _sequences(self, out: SchedulerOutput) -> StepInputs:
        """Each scheduled request's whole sequence up to its chunk's end, one per row,
        right-padded (causal attention never reads padding after a token, and positions
        count from 0 as the model numbers them itself): ``ids`` row-major [rows * length]."""
        rows = bucket(len(out.chunks), 1, self.max_num_seqs)
        length = bucket(max(c.start + c.count for c in out.chunks), MIN_TOKEN_BUCKET, self.max_model_len)
        inputs = self.empty_step(rows * length, rows)
        sampling_rows, sampling_ids = inputs.sampling_rows, []
        for row, chunk in enumerate(out.chunks):
            end, at = chunk.start + chunk.count, row * length
            inputs.ids[at : at + end] = chunk.request.tokens[:end]
            inputs.positions[at : at + end] = np.arange(end)
            if chunk.samples:
                sampling_rows[len(sampling_ids)] = at + end - 1
                sampling_ids.append(chunk.request.id)
        return dataclasses.replace(inputs, sampling_ids=sampling_ids)

    def _flat(self, out: SchedulerOutput, block_ids: Mapping[str, list[int]], tokens: int, requests: int) -> StepInputs:
        """The scheduled chunks one after another in ``tokens`` slots (padding last), with ``requests`` rows of block tables."""
        ids = np.zeros(tokens, np.int32)
        positions = np.full(tokens, -1, np.int32)
        slots = np.zeros(tokens, np.int32)  # padding writes into the null block
        rows = np.zeros(tokens, np.int32)
        tables = np.zeros((requests, self.blocks_per_request), np.int32)
        sampling_rows, sampling_ids, at = [], [], 0
        for row, chunk in enumerate(out.chunks):
            request = chunk.request
            table = block_ids[request.id]
            tables[row, : len(table)] = table
            span = np.arange(chunk.start, chunk.start + chunk.count)
            ids[at : at + chunk.count] = request.tokens[chunk.start : chunk.start + chunk.count]
            positions[at : at + chunk.count] = span
            slots[at : at + chunk.count] = np.asarray(table)[span // self.block_size] * self.block_size + span % self.block_size
            rows[at : at + chunk.count] = row
            at += chunk.count
            if chunk.samples:
                sampling_rows.append(at - 1)
                sampling_ids.append(request.id)
        sampling = np.zeros(requests, np.int32)
        sampling[: len(sampling_rows)] = sampling_rows
        return StepInputs(ids, positions, PagedBatch(positions, slots, rows, tables), sampling, sampling_ids)

    def sampled_rows(self, requests: int) -> int:
        """The rows of logits a step of ``requests`` (a bucket) returns: at least the
        smallest request bucket's, so that a step over a few rows (recurrent state,
        recomputed sequences) samples with the programs of a step of decodes."""
        return bucket(requests, MIN_REQUEST_BUCKET, self.max_num_seqs)

    def run(self, inputs: StepInputs) -> jax.Array:
        """The step on the device: the logits [:meth:`sampled_rows`, vocab] of the
        sampling tokens (rows past the step's requests are padding)."""
        place = self._forward.placement
        put = functools.partial(place.put, spec=())
        grid = None if inputs.grid is None else RowGrid(*map(put, inputs.grid))
        self.cache, logits = self._step(
            self._forward.params, self.cache, put(inputs.ids), PagedBatch(*map(put, inputs.batch)),
            put(inputs.sampling_rows), grid, self.sampled_rows(len(inputs.sampling_rows)),
        )
        return logits

    def _step_program(self, params: Any, cache: CacheArrays, ids: jax.Array, batch: PagedBatch,
                      sampling_rows: jax.Array, grid: RowGrid | None, logits_rows: int):
        """The step's cache and its logits padded to ``logits_rows`` rows (an argument, not
        this runner's limits, which a stored program is not keyed by)."""
        cache, logits = self._logits_program(params, cache, ids, batch, sampling_rows, grid)
        return cache, jnp.pad(logits.astype(jnp.float32), ((0, logits_rows - logits.shape[0]), (0, 0)))

    def _logits_program(self, params: Any, cache: CacheArrays, ids: jax.Array, batch: PagedBatch,
                        sampling_rows: jax.Array, grid: RowGrid | None) -> tuple[CacheArrays, jax.Array]:
        if self.recompute_reason is not None:
            return cache, self._sequences_traced(params, ids, batch.positions, sampling_rows)
        step = _Step(list(cache.pools), batch, self._forward.placement.mesh, self._heads_axes, grid, self._pool_of)
        if grid is not None:
            logits, states = self._rows_traced(step, params, cache.states, ids)
            return CacheArrays(tuple(step.pools), states), logits
        inputs = {"input_ids": to_traced(ids[None]), "use_cache": False}
        if self._keeps_logits:  # the vocabulary projection of the sampling tokens only
            inputs["logits_to_keep"] = to_traced(sampling_rows)
        logits = self._logits_traced(step, params, inputs, jnp.maximum(batch.positions, 0))[0]
        logits = logits if self._keeps_logits else logits[sampling_rows]
        return CacheArrays(tuple(step.pools), cache.states), logits

    def _rows_traced(self, step: _Step, params: Any, states: tuple[dict[str, jax.Array], ...], ids: jax.Array):
        """The logits [rows, vocab] of each row's last token, and the state slots after
        the rows ran: new prompts start from empty states, decodes from their slots'."""
        grid = step.grid
        rows = grid.state_slots.shape[0]
        length = ids.shape[0] // rows

        def as_rows(tokens: jax.Array) -> jax.Array:
            return tokens[grid.tokens_of_cells].reshape(rows, length)

        positions = as_rows(step.batch.positions)
        empty = length > 1  # prompts are scheduled whole (decodes are one token)
        before = tuple(
            {n: jnp.zeros((rows, *a.shape[1:]), a.dtype) if empty else a[grid.state_slots] for n, a in layer.items()}
            for layer in states
        )
        cache = _rows_cache(before, self._layout, empty)
        mask = (positions >= 0).astype(jnp.int32)  # recurrent layers zero a prompt's padding (a decode has none)
        inputs = self._step_inputs(to_traced(as_rows(ids)), to_traced(mask), cache, to_traced(jnp.maximum(positions, 0)))
        logits = self._logits_traced(step, params, inputs)[:, -1]
        after = [layer.linear_arrays() if isinstance(layer, TracedLinearLayer) else {} for layer in cache.layers]
        slots = jnp.where(grid.state_slots > 0, grid.state_slots, self.state_slots + 1)  # padding rows' go nowhere
        replicated = self._forward.placement.replicated  # as the slots were made: one program per bucket
        states = tuple(
            {n: jax.lax.with_sharding_constraint(a.at[slots].set(after[i][n].jax(), mode="drop"), replicated)
             for n, a in layer.items()}
            for i, layer in enumerate(states)
        )
        return logits, states

    def _sequences_traced(self, params: Any, ids: jax.Array, positions: jax.Array, sampling_rows: jax.Array) -> jax.Array:
        """The logits [rows, vocab] at ``sampling_rows`` of the model's uncached forward
        over the rows of :meth:`_sequences` (each row's first token is always attended,
        so a padding row is never wholly masked). Where the forward takes
        ``logits_to_keep``, the vocabulary projection runs at the sampled columns only
        ([rows, rows, vocab], not [rows, length, vocab])."""
        rows = sampling_rows.shape[0]
        ids, positions = ids.reshape(rows, -1), positions.reshape(rows, -1)
        row, column = jnp.divmod(sampling_rows, ids.shape[1])
        mask = (positions >= 0).at[:, 0].set(True).astype(jnp.int32)
        inputs = self._step_inputs.without_cache(to_traced(ids), to_traced(mask), to_traced(jnp.maximum(positions, 0)))
        if self._keeps_logits:
            inputs["logits_to_keep"] = to_traced(column)  # the same columns of every row: row i's is its i-th
            column = jnp.arange(rows)
        logits = self._forward.call_traced(params, inputs).logits.jax()
        return logits[row, column]

    def _logits_traced(self, step: _Step, params: Any, inputs: dict[str, Any], positions: jax.Array | None = None) -> jax.Array:
        """The model's logits on ``inputs`` inside a trace, its attention layers reading
        and writing ``step``; ``positions`` ([tokens], one row) are its tokens' position
        ids, given to the forward or, if it takes none, to its positional embeddings."""
        if positions is not None and self._takes_positions:
            inputs = {**inputs, "position_ids": to_traced(positions[None])}
        fed = positions if positions is not None and self._position_modules else None
        token = _current_step.set(step)
        try:
            with _paged_attention_named(self._model.torch_module), _positions_fed(self._position_modules, fed):
                return self._forward.call_traced(params, inputs).logits.jax()
        finally:
            _current_step.reset(token)


class _NotPageable(Exception):
    """Why the paged cache cannot carry a model (the engine recomputes it instead)."""


def _served(layer: LayerLayout) -> bool:
    """Whether the engine keeps ``layer``'s cache: attention keys and values, recurrent
    states, both, or nothing (a layer without attention or state, or one a text-only
    forward never writes, as cross-attention)."""
    kept = {n for n in layer.names if n.startswith((CONV, RECURRENT))} | {UNWRITTEN}
    return layer.names - kept in ({KEYS, VALUES}, frozenset())


class _PagedLayer(DynamicLayer):
    """An attention layer's cache in a step over rows: its keys and values go to the
    paged pool (the attention function writes them), so it hands them straight back."""

    def __init__(self) -> None:
        super().__init__()
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any):
        return key_states, value_states

    def get_seq_length(self) -> int:
        raise _NotPageable(
            "the model reads its cache's length (for positions or masks), and the paged cache's requests each have "
            "their own"
        )


class _PagedHybridLayer(TracedLinearLayer, _PagedLayer):
    """A layer with recurrent states and attention (paged)."""

    def __init__(self, arrays: Mapping[str, torch.Tensor], layout: LayerLayout, empty: bool) -> None:
        _PagedLayer.__init__(self)
        TracedLinearLayer.__init__(self, arrays, layout, empty)


def _rows_cache(states: tuple[dict[str, jax.Array], ...], layout: CacheLayout, empty: bool) -> Cache:
    """transformers' cache over the rows' recurrent ``states`` (traced), attention layers
    paged, layers with neither transformers' dummy layer."""
    layers: list[Any] = []
    for arrays, layer in zip(states, layout.layers):
        traced = {name: to_traced(a) for name, a in arrays.items()}
        attention = KEYS in layer.names
        if traced:
            layers.append(_PagedHybridLayer(traced, layer, empty) if attention else TracedLinearLayer(traced, layer, empty))
        else:
            layers.append(_PagedLayer() if attention else DummyLayer())
    return Cache(layers=layers)


def _powers(smallest: int, largest: int) -> list[int]:
    """The buckets from ``smallest`` doubling up to the one holding ``largest``."""
    sizes = [bucket(1, smallest, largest)]
    while sizes[-1] < largest:
        sizes.append(bucket(sizes[-1] + 1, smallest, largest))
    return sizes
