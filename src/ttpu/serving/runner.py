"""The engine's model runner (JAX backend): the paged KV pools (and recurrent state
slots) of one model, and one compiled step that runs the model over a flat, ragged batch
of tokens from many requests (:class:`~ttpu.backends.jax.paged.PagedModel`, the step
``generate()`` runs too) and returns the logits of the tokens that sample. The pools are
donated to each step. Steps are padded to buckets of tokens and of requests (powers of
two), so a running engine compiles one program per bucket pair.

Models with recurrent layers or sparse-attention indexers run one request per row
(:class:`~ttpu.backends.jax.paged.RowGrid`): a step of new prompts (of prompt chunks
and what cached prefixes leave of prompts, for the indexers), or a step of decodes.

Models whose cache or attention the paged pools cannot hold (no cache, a cache class of
their own, positions counted from the cache's length, attention outside the
interface) are found at construction and recomputed instead: each step runs its requests'
whole sequences, one per row, through the model's uncached forward.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ttpu.backends.base import CachedStepInputs
from ttpu.backends.jax.environment import to_traced
from ttpu.backends.jax.executables import Executables
from ttpu.backends.jax.paged import CacheArrays, NotPageable, PagedModel, RowGrid, trace_error
from ttpu.backends.jax.paged_attention import PagedBatch
from ttpu.errors import InvalidArgumentError
from ttpu.serving.scheduler import SchedulerOutput

logger = logging.getLogger(__name__)

MIN_TOKEN_BUCKET, MIN_REQUEST_BUCKET = 16, 8


def bucket(count: int, smallest: int, largest: int) -> int:
    """The power of two from ``smallest`` that holds ``count`` (at most ``largest``)."""
    size = smallest
    while size < count:
        size *= 2
    return min(size, max(largest, count))


@dataclass(frozen=True)
class StepInputs:
    """One step's padded host arrays; ``sampling_rows[i]`` is the token whose logits
    pick request ``sampling_ids[i]``'s next token (with a ``grid``, the last of its row)."""

    ids: np.ndarray
    positions: np.ndarray
    batch: PagedBatch
    sampling_rows: np.ndarray
    sampling_ids: list[str]
    grid: RowGrid | None = None


class ModelRunner:
    """The paged KV pools (and recurrent state slots) of one model and its compiled step."""

    def __init__(self, model: Any, num_blocks: int, block_size: int, max_model_len: int,
                 max_num_batched_tokens: int, max_num_seqs: int) -> None:
        self._model = model
        self._forward = model.compiled_forward
        self._step_inputs = CachedStepInputs(model.torch_module)
        self._keeps_logits = "logits_to_keep" in inspect.signature(model.torch_module.forward).parameters
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.blocks_per_request = -(-max_model_len // block_size)
        self.max_model_len = max_model_len
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_num_seqs = max_num_seqs
        self.recompute_reason: str | None = None  # why the paged cache cannot hold the model, if it cannot
        decoder = model.decoder()
        self._layers = len(decoder.layout.layers)
        self._paged: PagedModel | None = None
        try:
            self._paged = decoder.paged_model()
            limit = self._paged.positions_limit
            if limit is not None and max(max_model_len, max_num_batched_tokens) >= limit:
                raise NotPageable(
                    f"its attention temperature tuning counts positions from the cache, exact only below "
                    f"floor_scale={limit} (lower max_model_len and max_num_batched_tokens below it)"
                )
        except NotPageable as reason:
            self._paged, self.recompute_reason = None, str(reason)
        self.has_states = self._paged is not None and self._paged.has_states
        self.in_rows = self._paged is not None and self._paged.in_rows
        self.prefix_caching_refusal = self._prefix_caching_refusal()
        self.chunked_prefills = self.in_rows and self.caches_prefixes  # rows of prompt chunks (indexers)
        self.state_slots = max_num_seqs if self.has_states else 0  # one per seat, besides padding's slot 0
        self.cache = self._empty()
        if self.recompute_reason is not None:
            self._check_recompute()
        self._step = Executables(self._step_program, static_argnums=(6,), donate_argnums=(1,), name="serving_step",
                                 store=self._forward.program_store, background_warm_up=False)

    def _prefix_caching_refusal(self) -> str | None:
        """Why requests cannot start after cached prefix blocks, or None if they can (the
        pools hold all the model caches, per block, and its steps can start past computed
        positions)."""
        if self._paged is None:
            return "it caches nothing (each step recomputes its requests' sequences)"
        if self.has_states:
            return "it keeps recurrent states per request, not per block"
        if self.in_rows and not self._paged.caches_prefixes:
            return "an attention call without its indexer's choice attends within each row of new prompts only"
        return None

    @property
    def caches_prefixes(self) -> bool:
        return self.prefix_caching_refusal is None

    @property
    def whole_prompts(self) -> bool:
        """Whether steps run one request per row, so prompts are prefilled whole, in steps
        of their own (recurrent states; sparse-attention indexers; recomputed sequences)."""
        return self.in_rows or self.recompute_reason is not None

    def _empty(self) -> CacheArrays:
        if self._paged is None:
            return CacheArrays((), ({},) * self._layers)
        return self._paged.empty(self.num_blocks, self.block_size, self.state_slots)

    def _check_recompute(self) -> None:
        """Trace (not compile) a step of whole sequences, so that a model the engine
        cannot run either way is refused now, not in its first step."""
        name = type(self._model.torch_module).__name__
        for tokens, requests in ((MIN_TOKEN_BUCKET, 1), (MIN_REQUEST_BUCKET, MIN_REQUEST_BUCKET)):
            inputs = self.empty_step(tokens, requests)
            message = trace_error(functools.partial(self._step_program, logits_rows=self.sampled_rows(requests)),
                                  self._forward.params, self.cache, inputs.ids, inputs.batch, inputs.sampling_rows,
                                  inputs.grid)
            if message is not None:
                raise InvalidArgumentError(
                    f"the serving engine cannot run {name} recomputing whole sequences ({message}); "
                    f"it cannot page its cache either ({self.recompute_reason})"
                )
        logger.warning(
            "the serving engine recomputes each request's whole sequence at every step for %s (no KV cache, "
            "O(length) per token): %s", name, self.recompute_reason,
        )

    @property
    def compile_count(self) -> int:
        return len(self._step)

    def cache_lost(self) -> bool:
        """Whether a failed step took the (donated) cache arrays with it."""
        return any(array.is_deleted() for array in jax.tree.leaves(self.cache))

    def reset_cache(self) -> None:
        """Empty cache arrays in place of lost ones."""
        self.cache = self._empty()

    def buckets(self) -> list[tuple[int, int]]:
        """Every (token, request) bucket pair a step can be padded to. In one row: ``r``
        requests scheduled means at least ``r`` tokens, so a pair needs ``tokens >`` half
        of ``requests``. In rows: decodes (one token per row), and new prompts padded to
        a length whose rows the scheduler fits in the token budget (a whole prompt of any
        length alone, unless prompts are chunked). Recomputed: the same rows of whole
        sequences, for new prompts and decodes alike."""
        if self.recompute_reason is not None:
            return [(rows * length, rows) for length in _powers(MIN_TOKEN_BUCKET, self.max_model_len)
                    for rows in _powers(1, self.max_num_seqs)
                    if rows == 1 or rows * length <= self.max_num_batched_tokens]
        if not self.in_rows:
            tokens = _powers(MIN_TOKEN_BUCKET, self.max_num_batched_tokens)
            requests = _powers(MIN_REQUEST_BUCKET, self.max_num_seqs)
            least = functools.partial(bucket, smallest=MIN_TOKEN_BUCKET, largest=self.max_num_batched_tokens)
            return [(t, r) for t in tokens for r in requests if t >= least(r // 2 + 1)]
        pairs = [(rows, rows) for rows in _powers(MIN_REQUEST_BUCKET, self.max_num_seqs)]
        budget = max(self.max_num_batched_tokens, MIN_TOKEN_BUCKET)
        for length in _powers(MIN_TOKEN_BUCKET, self.max_model_len):
            pairs += [(rows * length, rows) for rows in _powers(1, self.max_num_seqs)
                      if (rows == 1 and not self.chunked_prefills) or rows * length <= budget]
        return pairs

    def prefill_tokens(self, prompts: int, longest: int) -> int:
        """The tokens of a step of ``prompts`` prompts (or chunks), the longest ``longest``
        tokens, padded to its rows (models stepped in rows: the scheduler keeps them within
        the budget)."""
        return bucket(prompts, 1, self.max_num_seqs) * bucket(longest, MIN_TOKEN_BUCKET, self.max_model_len)

    def empty_step(self, tokens: int, requests: int) -> StepInputs:
        """A step of padding only (it writes the null block and state slot), to compile a bucket pair."""
        positions = np.full(tokens, -1, np.int32)
        zeros = np.zeros(tokens, np.int32)
        tables = np.zeros((requests, self.blocks_per_request), np.int32)
        batch = PagedBatch(positions, zeros, zeros, tables)
        grid = RowGrid(np.zeros(requests, np.int32)) if self.in_rows else None
        return StepInputs(np.zeros(tokens, np.int32), positions, batch, np.zeros(requests, np.int32), [], grid)

    def prepare(self, out: SchedulerOutput, block_ids: Mapping[str, list[int]],
                state_slots: Mapping[str, int]) -> StepInputs:
        """The scheduled chunks as padded arrays (tokens and requests rounded up to
        buckets); for a model stepped in rows, as rows instead (each request's chunk at the
        end of its row) over the requests' ``state_slots`` (request id -> slot; read for
        recurrent states only)."""
        if self.recompute_reason is not None:
            return self._sequences(out)
        if not self.in_rows:
            tokens = bucket(out.num_tokens, MIN_TOKEN_BUCKET, self.max_num_batched_tokens)
            return self._flat(out, block_ids, tokens, bucket(len(out.chunks), MIN_REQUEST_BUCKET, self.max_num_seqs))
        decodes = all(chunk.start > 0 and chunk.count == 1 for chunk in out.chunks)
        if not (decodes or self.chunked_prefills or all(c.start == 0 and c.count == c.request.num_tokens
                                                        for c in out.chunks)):
            raise InvalidArgumentError(
                "a step over rows is either whole new prompts or one decode token per request (prompt chunks and "
                "prompts after a cached prefix where the model's rows may start after computed positions)"
            )
        if decodes:
            length, rows = 1, bucket(len(out.chunks), MIN_REQUEST_BUCKET, self.max_num_seqs)
        else:
            length = bucket(max(c.count for c in out.chunks), MIN_TOKEN_BUCKET, self.max_model_len)
            rows = bucket(len(out.chunks), 1, self.max_num_seqs)
        inputs = self._flat(out, block_ids, rows * length, rows, row_length=length)
        slots = np.zeros(rows, np.int32)
        if self.has_states:
            slots[: len(out.chunks)] = [state_slots[chunk.request.id] for chunk in out.chunks]
        return dataclasses.replace(inputs, grid=RowGrid(slots))

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

    def _flat(self, out: SchedulerOutput, block_ids: Mapping[str, list[int]], tokens: int, requests: int,
              row_length: int | None = None) -> StepInputs:
        """The scheduled chunks one after another in ``tokens`` slots (padding last), with
        ``requests`` rows of block tables; with ``row_length``, chunk ``r`` at the end of
        row ``r`` of that many slots instead (rows left-padded)."""
        ids = np.zeros(tokens, np.int32)
        positions = np.full(tokens, -1, np.int32)
        slots = np.zeros(tokens, np.int32)  # padding writes into the null block
        rows = np.zeros(tokens, np.int32)
        tables = np.zeros((requests, self.blocks_per_request), np.int32)
        sampling_rows, sampling_ids, at = [], [], 0
        for row, chunk in enumerate(out.chunks):
            request = chunk.request
            table = block_ids[request.id]
            if row_length is not None:
                at = (row + 1) * row_length - chunk.count
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
        if self._paged is None:
            return cache, self._sequences_traced(params, ids, batch.positions, sampling_rows)
        return self._paged.logits(params, cache, ids, batch, sampling_rows, grid)

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

def _powers(smallest: int, largest: int) -> list[int]:
    """The buckets from ``smallest`` doubling up to the one holding ``largest``."""
    sizes = [bucket(1, smallest, largest)]
    while sizes[-1] < largest:
        sizes.append(bucket(sizes[-1] + 1, smallest, largest))
    return sizes
