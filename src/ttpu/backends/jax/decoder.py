"""The JAX decode loop: a jitted prefill and a jitted ``lax.while_loop`` of decode
steps, the whole state (cache, tokens, mask) passed in, donated and returned; each
token is chosen by the sampler the serving engine uses too
(:func:`ttpu.backends.jax.sampling.sample`), row ``i`` drawing with seed ``seed + i``.

The model runs the serving engine's paged step (:class:`~ttpu.backends.jax.paged.PagedModel`)
wherever that step can carry it: each row owns a fixed run of blocks in the pools (and a
recurrent-state slot), the prompts run as one step of whole rows, each row attending
within itself, each decode as one token per row; a batch split over data axes splits
the pools with it, by block (each replica's rows own blocks of its own pool). Otherwise
(a cache the paged pools cannot hold) it runs over the model's own dense cache, or
recomputes the sequence for a model that keeps none.

The prefill writes indices ``0..P-1`` of the cache and picks the first new token (index
``P``); each step feeds the token at index ``cache.length`` and writes the next one
after it. One host call runs up to ``steps`` tokens, stopping early when every row has
finished.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import torch

from ttpu.backends.base import CachedStepInputs, Decoder
from ttpu.backends.jax.backend import JaxForward
from ttpu.backends.jax.environment import to_traced
from ttpu.backends.jax.executables import Executables
from ttpu.backends.jax.kv_cache import CacheLayout, CacheState, TracedCache, probe_layout
from ttpu.backends.jax.paged import CacheArrays, NotPageable, PagedModel, RowGrid
from ttpu.backends.jax.paged_attention import PagedBatch
from ttpu.backends.jax.sampling import ProcessorValues, RowSampling, SamplerMode, generation_sampling, sample
from ttpu.errors import CompilationError
from ttpu.generation.config import GenerationSettings
from ttpu.sharding.rules import Axis

logger = logging.getLogger(__name__)

BLOCK_SIZE = 16  # positions per block of a generation's paged pools


class PagedCache(NamedTuple):
    """A generation's paged pools and recurrent-state slots (row ``r``: slot ``r + 1``)
    and each row's blocks."""

    arrays: CacheArrays
    tables: jax.Array  # [batch, max_length / BLOCK_SIZE] row r's blocks, numbered in its replica's part of the pools
    length: jax.Array  # () indices of the token buffer run so far (the next one fed is at this index)


class PromptStep(NamedTuple):
    """The left-padded prompts [batch, length] as one step of the paged model, row after
    row as they are (padding in place, position -1): each row attends within itself
    (``new_rows``), as a dense cache's prefill does."""

    batch: PagedBatch  # row r writes into the blocks of its block table
    last_tokens: jax.Array  # [batch] each row's last real token in the step
    grid: RowGrid | None  # models stepped in rows (recurrent state, indexers): the rows as they are


class DecodeState(NamedTuple):
    """Everything the loop carries from one token to the next."""

    cache: CacheState | PagedCache  # the dense cache's arrays (keys and values, linear states, ...), or the paged pools
    tokens: jax.Array  # [batch, max_length] every token at its cache index
    mask: jax.Array  # [batch, max_length] 1 where a real token sits
    positions: jax.Array  # [batch] position id of the token fed next
    generated: jax.Array  # () tokens generated so far
    finished: jax.Array  # [batch] ended with an EOS token


class Sampling(NamedTuple):
    """A generation's sampling settings (traced; placed on every device once, not per call)."""

    rows: RowSampling  # every row's settings (steps, history and prompt bounds filled per step)
    processors: ProcessorValues
    prompt_length: jax.Array  # the prompts' width as given (bucket padding before it)
    eos_ids: jax.Array  # [n]
    pad_id: jax.Array
    max_new_tokens: jax.Array


class Generation(NamedTuple):
    """One generation in flight: the loop state and the sampling settings it runs with."""

    state: DecodeState
    mode: SamplerMode
    sampling: Sampling


class JaxDecoder(Decoder):
    """Compiled prefill and decode steps of one causal LM."""

    def __init__(self, forward: JaxForward, module: torch.nn.Module):
        self._forward = forward
        self._module = module
        self._placement = forward.placement
        self._paged: PagedModel | NotPageable | None = None  # built on first use
        self._vocab_size = module.config.get_text_config(decoder=True).vocab_size
        store = forward.program_store
        self._step_inputs = CachedStepInputs(module)
        self.layout = probe_layout(forward.call_traced, forward.params, store, self._probe_step)
        self._said_recompute = False
        self._prefill = Executables(
            self._prefill_program, static_argnums=(5, 6), donate_argnums=(1,), name="prefill", store=store
        )
        self._advance = Executables(
            self._advance_program, static_argnums=(4,), donate_argnums=(1,), name="decode", store=store
        )

    def _say_recompute(self) -> None:
        """Warn, once, that generation recomputes the whole sequence at every step."""
        if not self._said_recompute:
            logger.warning(
                "generate() on %s recomputes the whole sequence at every step (O(length) per token): %s",
                type(self._module).__name__, self.layout.recompute,
            )
            self._said_recompute = True

    @property
    def compile_count(self) -> int:
        return len(self._prefill) + len(self._advance)

    @property
    def trace_count(self) -> int:
        """Programs traced (not read from the program store) since this decoder was built."""
        return self._prefill.traces + self._advance.traces

    def start(
        self,
        input_ids: np.ndarray,
        prompt_mask: np.ndarray,
        max_length: int,
        settings: GenerationSettings,
        seed: int,
    ) -> Generation:
        place = self._placement
        mode, rows, processors = generation_sampling(settings, input_ids.shape[0], self._vocab_size, seed)
        eos = jnp.asarray(settings.eos_token_ids, jnp.int32).reshape(-1)
        sampling = Sampling(rows, processors, jnp.int32(settings.prompt_length), eos, jnp.int32(settings.pad_token_id),
                            jnp.int32(settings.max_new_tokens))
        sampling = jax.tree.map(lambda v: place.put(v, ()), sampling)
        batch, length = input_ids.shape
        paged = self.paged_for(batch, length, max_length)
        if paged is not None and paged.has_states and _has_holes(prompt_mask):
            paged = None  # a recurrent layer runs a masked token as a zeroed step; the paged rows drop it
        if paged is None and self.layout.recompute:  # (with the cache's layers, the paged step may carry them)
            self._say_recompute()
        prompt = None
        if paged is None:
            cache = self.layout.empty(batch, max_length, place)
        else:
            replicas = self._replicas(batch)
            local = 1 + np.arange(batch // replicas * -(-max_length // BLOCK_SIZE), dtype=np.int32)
            tables = np.tile(local.reshape(batch // replicas, -1), (replicas, 1))  # each replica's rows: its own blocks
            arrays = paged.empty(replicas * (1 + local.size), BLOCK_SIZE, batch if paged.has_states else 0,
                                 self._replica_axes(batch))
            cache = PagedCache(arrays, place.put(tables, ()), place.put(np.int32(0), ()))
            prompt = jax.tree.map(lambda v: place.put(v, ()),
                                  _prompt_step(prompt_mask, tables, replicas, paged.in_rows))
        state = self._prefill(
            self._forward.params, cache, place.batch(input_ids.astype(np.int32)),
            place.batch(prompt_mask.astype(np.int32)), sampling, mode, max_length, prompt,
        )
        return Generation(state, mode, sampling)

    def paged_model(self) -> PagedModel:
        """The model's paged step, shared with the serving engine (built on first use);
        raises :class:`NotPageable`, with the reason, for a model its pools cannot carry."""
        if self._paged is None:
            try:
                self._paged = PagedModel(self._forward, self._module, self.layout)
            except NotPageable as reason:
                self._paged = reason
            except CompilationError as error:  # the probe itself failed: the dense cache and recomputing still run
                logger.warning("the paged step's probe failed for %s: %s", type(self._module).__name__, error)
                self._paged = NotPageable(f"its probe failed ({str(error).splitlines()[0][:300]})")
        if isinstance(self._paged, NotPageable):
            raise NotPageable(str(self._paged))
        return self._paged

    def _replica_axes(self, batch: int) -> Axis:
        """The mesh axes a batch of ``batch`` rows splits over (as the dense cache's does):
        each part of it runs on its own replica of the paged pools."""
        return self._placement.plan.batch_spec((batch,))[0]

    def _replicas(self, batch: int) -> int:
        return self._placement.plan.mesh.split(self._replica_axes(batch))

    def paged_for(self, batch: int, prompt_length: int, max_length: int) -> PagedModel | None:
        """The paged step if it carries this generation exactly, else None (the dense cache)."""
        try:
            paged = self.paged_model()
        except NotPageable:
            return None
        limit = paged.positions_limit
        step_tokens = max(max_length, batch * prompt_length)
        return None if limit is not None and step_tokens >= limit else paged

    def advance(self, state: Generation, steps: int) -> Generation:
        """``state`` is donated: use the returned one."""
        run = self._advance(
            self._forward.params, state.state, self._placement.put(np.int32(steps), ()), state.sampling, state.mode
        )
        return state._replace(state=run)

    def read(self, state: Generation) -> tuple[int, np.ndarray]:
        # Copied whole (a small buffer) and cut on the host: slicing the device array
        # would build a new little XLA program for every length.
        to_host = self._placement.to_host
        return int(to_host(state.state.generated)), to_host(state.state.tokens).astype(np.int64)

    def finish(self, state: Generation, rows: Sequence[int]) -> Generation:
        finished = state.state.finished.at[np.asarray(rows, np.int64)].set(True)
        return state._replace(state=state.state._replace(finished=finished))

    def _model_step(
        self,
        params: Any,
        cache: CacheState,
        ids: jax.Array,
        positions: jax.Array,
        mask: jax.Array,
        empty: bool,
        layout: CacheLayout | None = None,
    ):
        """The next-token logits [batch, vocab] after ``ids`` and the cache they leave
        (laid out as ``layout``, by default the model's)."""
        layout = layout or self.layout
        traced = TracedCache(cache, layout, empty)
        inputs = self._step_inputs(to_traced(ids), to_traced(mask), traced, to_traced(positions))
        out = self._forward.call_traced(params, inputs)
        cache = layout.constrained(traced.state(ids.shape[1]), self._placement)
        return out.logits.jax()[:, -1], cache

    def _probe_step(self, params: Any, cache: CacheState, layout: CacheLayout) -> jax.Array:
        """One decode step of one row over a cache holding one position (traced while
        the layout is probed)."""
        one = jnp.ones((1, 1), jnp.int32)
        return self._model_step(params, cache, one, one, jnp.ones((1, 2), jnp.int32), False, layout)[0]

    def _recompute_step(self, params: Any, cache: CacheState, tokens: jax.Array, mask: jax.Array, last: jax.Array):
        """For models whose forward keeps no cache: the forward over the whole token
        buffer (later positions masked out), the logits at ``last``; the cache is only a
        position counter."""
        inputs = self._step_inputs.without_cache(to_traced(tokens), to_traced(mask), to_traced(_positions(mask)))
        logits = self._forward.call_traced(params, inputs).logits.jax()
        return jax.lax.dynamic_index_in_dim(logits, last, axis=1, keepdims=False), cache._replace(length=last + 1)

    def _paged_decode(self, params: Any, cache: PagedCache, ids: jax.Array, positions: jax.Array):
        """The paged step of one token per row (``ids``, ``positions`` [batch]): the
        next-token logits [batch, vocab] and the cache after it."""
        batch = ids.shape[0]
        rows = jnp.arange(batch, dtype=jnp.int32)
        slots = cache.tables[rows, positions // BLOCK_SIZE] * BLOCK_SIZE + positions % BLOCK_SIZE
        paged = self.paged_model()
        grid = RowGrid(rows + 1) if paged.in_rows else None
        columns = jnp.full_like(positions, cache.length)  # the tokens' indices in the buffer, left padding counted
        local = PagedBatch(positions, slots, rows % (batch // self._replicas(batch)), cache.tables)  # rows per replica
        arrays, logits = paged.logits(params, cache.arrays, ids, local, None, grid, columns,
                                      replica_axes=self._replica_axes(batch))
        return logits, cache._replace(arrays=arrays, length=cache.length + 1)

    def _prefill_program(self, params, cache, ids, prompt_mask, sampling: Sampling, mode: SamplerMode, max_length: int,
                         prompt: PromptStep | None):
        batch, prompt_length = ids.shape
        positions = _positions(prompt_mask)
        mask = jnp.zeros((batch, max_length), jnp.int32).at[:, :prompt_length].set(prompt_mask)
        tokens = jnp.full((batch, max_length), sampling.pad_id, jnp.int32).at[:, :prompt_length].set(ids)
        if prompt is not None:
            columns = jnp.tile(jnp.arange(prompt_length, dtype=jnp.int32), batch)
            arrays, logits = self.paged_model().logits(params, cache.arrays, ids.reshape(-1), prompt.batch,
                                                       prompt.last_tokens, prompt.grid, columns, new_rows=prompt_length,
                                                       replica_axes=self._replica_axes(batch))
            cache = cache._replace(arrays=arrays, length=jnp.int32(prompt_length))
        elif self.layout.recompute:
            logits, cache = self._recompute_step(params, cache, tokens, mask, jnp.int32(prompt_length - 1))
        else:
            logits, cache = self._model_step(params, cache, ids, positions, mask[:, :prompt_length], empty=True)
        token = self._next_tokens(logits, tokens, mask, jnp.int32(0), jnp.int32(prompt_length), sampling, mode)
        return DecodeState(
            cache=cache,
            tokens=tokens.at[:, prompt_length].set(token),
            mask=mask.at[:, prompt_length].set(1),
            positions=positions[:, -1] + 1,
            generated=jnp.int32(1),
            finished=jnp.isin(token, sampling.eos_ids),
        )

    def _next_tokens(self, logits, tokens, mask, generated, output_start, sampling: Sampling, mode: SamplerMode):
        """The sampler on the rows' tokens so far (the prompts padded to ``output_start``,
        then ``generated`` new ones)."""
        batch = tokens.shape[0]
        rows = sampling.rows._replace(
            steps=jnp.full((batch,), generated, jnp.int32),
            history=jnp.where(mask > 0, tokens, logits.shape[-1]),
            prompt_starts=jnp.full((batch,), output_start - sampling.prompt_length, jnp.int32),
            prompt_lens=jnp.full((batch,), output_start, jnp.int32),
        )
        return sample(logits, rows, mode, sampling.processors).tokens

    def _advance_program(self, params, state: DecodeState, steps, sampling: Sampling, mode: SamplerMode):
        limit = jnp.minimum(state.generated + steps, sampling.max_new_tokens)

        def more(s: DecodeState) -> jax.Array:
            return (s.generated < limit) & ~jnp.all(s.finished)

        def step(s: DecodeState) -> DecodeState:
            index = s.cache.length
            if isinstance(s.cache, PagedCache):
                fed = jax.lax.dynamic_slice_in_dim(s.tokens, index, 1, axis=1)[:, 0]
                logits, cache = self._paged_decode(params, s.cache, fed, s.positions)
            elif self.layout.recompute:
                logits, cache = self._recompute_step(params, s.cache, s.tokens, s.mask, index)
            else:
                fed = jax.lax.dynamic_slice_in_dim(s.tokens, index, 1, axis=1)
                logits, cache = self._model_step(params, s.cache, fed, s.positions[:, None], s.mask, empty=False)
            token = self._next_tokens(logits, s.tokens, s.mask, s.generated, index + 1 - s.generated, sampling, mode)
            token = jnp.where(s.finished, sampling.pad_id, token)
            ones = jnp.ones((token.shape[0], 1), jnp.int32)
            return DecodeState(
                cache=cache,
                tokens=jax.lax.dynamic_update_slice_in_dim(s.tokens, token[:, None], index + 1, axis=1),
                mask=jax.lax.dynamic_update_slice_in_dim(s.mask, ones, index + 1, axis=1),
                positions=s.positions + 1,
                generated=s.generated + 1,
                finished=s.finished | jnp.isin(token, sampling.eos_ids),
            )

        return jax.lax.while_loop(more, step, state)


def _has_holes(mask: np.ndarray) -> bool:
    """Whether some row has a masked position after its first real token."""
    return bool(((np.cumsum(mask, axis=1) > 0) & (mask == 0)).any())


def _prompt_step(mask: np.ndarray, tables: np.ndarray, replicas: int, rows_as_grid: bool) -> PromptStep:
    """The left-padded prompts (``mask`` [batch, length]: 1 at real tokens) as one paged
    step, row ``r`` writing into the blocks ``tables[r]`` (padding into the null block),
    the rows split evenly over ``replicas`` (numbered from 0 in each)."""
    rows, length = mask.shape
    cells = np.arange(rows * length, dtype=np.int32)
    row = cells // length
    real = mask.reshape(-1) > 0
    positions = np.where(real, np.cumsum(mask, axis=1).reshape(-1) - 1, -1).astype(np.int32)
    at = np.maximum(positions, 0)
    slots = np.where(real, tables[row, at // BLOCK_SIZE] * BLOCK_SIZE + at % BLOCK_SIZE, 0).astype(np.int32)
    last = (np.arange(rows) * length + length - 1 - np.argmax(mask[:, ::-1] > 0, axis=1)).astype(np.int32)
    grid = RowGrid(np.arange(1, rows + 1, dtype=np.int32)) if rows_as_grid else None
    return PromptStep(PagedBatch(positions, slots, row % (rows // replicas), tables), last, grid)


def _positions(mask: jax.Array) -> jax.Array:
    """Position ids of left-padded rows: real tokens count from 0 (padding sits at 0)."""
    return jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)
