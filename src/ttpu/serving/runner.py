"""The engine's model runner (JAX backend): one compiled step runs a stock transformers
model over a flat, ragged batch of tokens from many requests, reading and writing a
paged KV pool, and returns the logits of the tokens that sample.

The model is adapted through transformers' own seam: a "ttpu_paged" attention function is
registered with ``AttentionInterface`` (and no mask function, so transformers builds no
mask); while the step is traced the model's configs name it, and each attention layer
writes its new keys and values into its pool by slot and attends through the block
tables (:mod:`ttpu.serving.paged_attention`). The pools are donated to each step.
Steps are padded to buckets of tokens and of requests (powers of two), so a running
engine compiles one program per bucket pair.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import inspect
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import torch
from jax.sharding import Mesh
from transformers import AttentionInterface

from ttpu.backends.jax.environment import to_traced
from ttpu.backends.jax.executables import Executables
from ttpu.backends.jax.kv_cache import KEYS, VALUES, CacheLayout
from ttpu.backends.jax.torchax_compat import import_torchax
from ttpu.errors import InvalidArgumentError
from ttpu.serving.paged_attention import PagedBatch, paged_attention_kernel, split_over_heads, write_kv
from ttpu.serving.scheduler import SchedulerOutput

PAGED_ATTENTION = "ttpu_paged"
MIN_TOKEN_BUCKET, MIN_REQUEST_BUCKET = 16, 8

torchax = import_torchax()
Pools = tuple[jax.Array, ...]  # per layer: [num_blocks, block_size, 2 * kv_heads, dim] (paged_attention's layout)


class AttentionCall(NamedTuple):
    """What one attention call of a layer receives: key heads, key and value widths,
    dtype and sliding window (recorded by a probe trace, to size the pools)."""

    kv_heads: int
    key_dim: int
    value_dim: int
    dtype: str
    sliding_window: int | None


@dataclass
class _Step:
    """What the attention layers of the step being traced read and write; a probe
    (``pools`` None) records each layer's calls instead."""

    pools: list[jax.Array] | None
    batch: PagedBatch | None
    mesh: Mesh | None = None
    heads_axes: tuple[str | None, ...] = ()  # per layer: the mesh axis its pool's heads are split over
    calls: dict[int, list[AttentionCall]] = field(default_factory=dict)


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
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers attention function over the step's paged pools; ``query``, ``key``,
    ``value`` are [1, heads, tokens, dim]."""
    step = _current_step.get()
    view = torchax.interop.jax_view
    q, k, v = (jnp.swapaxes(view(x)[0], 0, 1) for x in (query, key, value))  # [tokens, heads, dim]
    if step.pools is None:
        call = AttentionCall(k.shape[1], k.shape[2], v.shape[2], str(k.dtype), sliding_window)
        step.calls.setdefault(module.layer_idx, []).append(call)
        return to_traced(jnp.zeros((1, q.shape[0], q.shape[1], v.shape[2]), q.dtype)), None
    pool = step.pools[module.layer_idx]
    padded = functools.partial(_pad_last, size=pool.shape[-1])  # keys and values of unequal widths share the pool's
    pool = write_kv(pool, padded(k), padded(v), step.batch.slots)
    step.pools[module.layer_idx] = pool
    options = {"scale": scaling if scaling is not None else q.shape[-1] ** -0.5, "sliding_window": sliding_window,
               "softcap": softcap}
    if s_aux is not None:
        options["sinks"] = view(s_aux)
    kernel = paged_attention_kernel(sinks=s_aux is not None)
    if step.heads_axes[module.layer_idx] is not None:
        kernel = split_over_heads(kernel, step.mesh, step.heads_axes[module.layer_idx])
    out = kernel(padded(q), pool, step.batch, **options)[..., : v.shape[-1]]
    return to_traced(out[None]), None


def _pad_last(x: jax.Array, size: int) -> jax.Array:
    return x if x.shape[-1] == size else jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, size - x.shape[-1])])


AttentionInterface.register(PAGED_ATTENTION, paged_attention_forward)


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


def bucket(count: int, smallest: int, largest: int) -> int:
    """The power of two from ``smallest`` that holds ``count`` (at most ``largest``)."""
    size = smallest
    while size < count:
        size *= 2
    return min(size, max(largest, count))


@dataclass(frozen=True)
class StepInputs:
    """One step's padded host arrays; ``sampling_rows[i]`` is the token whose logits
    pick request ``sampling_ids[i]``'s next token."""

    ids: np.ndarray
    positions: np.ndarray
    batch: PagedBatch
    sampling_rows: np.ndarray
    sampling_ids: list[str]


class ModelRunner:
    """The paged KV pools of one model and its compiled step."""

    def __init__(self, model: Any, layout: CacheLayout, num_blocks: int, block_size: int, max_model_len: int,
                 max_num_batched_tokens: int, max_num_seqs: int) -> None:
        if layout.recompute or any(set(layer.names) != {KEYS, VALUES} for layer in layout.layers):
            raise InvalidArgumentError(
                f"the serving engine runs models whose every layer caches attention keys and values; "
                f"{type(model.torch_module).__name__} has {layout.describe()}: use model.generate() for it"
            )
        self._model = model
        self._forward = model.compiled_forward
        parameters = inspect.signature(model.torch_module.forward).parameters
        if "position_ids" not in parameters:
            raise InvalidArgumentError(
                f"the serving engine runs many requests in one row of tokens, each numbered by position_ids; "
                f"{type(model.torch_module).__name__}.forward takes none (it numbers positions itself): "
                "use model.generate() for it"
            )
        self._keeps_logits = "logits_to_keep" in parameters
        self.block_size = block_size
        self.blocks_per_request = -(-max_model_len // block_size)
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_num_seqs = max_num_seqs
        calls = self._attention_calls(len(layout.layers))
        self._new_pools = lambda: tuple(self._pool(calls[index], num_blocks) for index in range(len(layout.layers)))
        self.pools: Pools = self._new_pools()
        self._heads_axes = tuple(pool.sharding.spec[2] if pool.sharding.spec else None for pool in self.pools)
        self._step = Executables(self._step_program, donate_argnums=(1,), name="serving_step", store=None)

    @property
    def compile_count(self) -> int:
        return len(self._step)

    def pools_lost(self) -> bool:
        """Whether a failed step took the (donated) pools with it."""
        return any(pool.is_deleted() for pool in self.pools)

    def reset_pools(self) -> None:
        """Empty pools in place of lost ones."""
        self.pools = self._new_pools()

    def _attention_calls(self, layers: int) -> dict[int, AttentionCall]:
        """Each layer's attention call, from a trace of one step with a probe in place of
        the paged attention; refuses the models whose attention the engine would get
        wrong (not through the interface, several calls per layer, a window kept only in
        a mask)."""
        module = self._model.torch_module
        name = type(module).__name__
        step = _Step(None, None)

        def probe(params: Any, ids: jax.Array) -> jax.Array:
            return self._logits_traced(step, params, {"input_ids": to_traced(ids), "position_ids": to_traced(ids * 0)})

        try:
            jax.eval_shape(probe, self._forward.params, jax.ShapeDtypeStruct((1, MIN_TOKEN_BUCKET), jnp.int32))
        except Exception as error:  # noqa: BLE001  the model's own code raised: say which and why
            raise InvalidArgumentError(
                f"{name} does not run with the serving engine's paged attention ({type(error).__name__}: "
                f"{str(error).splitlines()[0][:300]}); its attention likely computes scores itself instead of "
                "calling transformers' AttentionInterface: use model.generate() for it"
            ) from None  # the message carries the model's error; its trace is not the caller's concern
        problems = [f"layer {i} calls attention {len(c)} times" for i, c in sorted(step.calls.items()) if len(c) > 1]
        problems += [f"layer {i} never calls transformers' attention function" for i in range(layers) if i not in step.calls]
        config = module.config.get_text_config(decoder=True)
        kinds = getattr(config, "layer_types", None) or getattr(config, "attention_layers", None) or []
        problems += [
            f"layer {i} is {kind!r} attention, whose window reaches attention only through a mask"
            for i, kind in enumerate(kinds)
            if kind not in ("full_attention", "global", "attention") and i in step.calls
            and step.calls[i][0].sliding_window is None
        ]
        if problems:
            raise InvalidArgumentError(
                f"the serving engine cannot run {name}: {'; '.join(problems[:3])}. It runs models whose every layer "
                "attends once through transformers' AttentionInterface: use model.generate() for it"
            )
        return {i: c[0] for i, c in step.calls.items()}

    def _pool(self, call: AttentionCall, num_blocks: int) -> jax.Array:
        """One layer's zeroed pool, [num_blocks, block_size, 2 * kv_heads, head_dim] for
        the keys and values its attention ``call`` receives (the wider width if they
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
        """Every (token, request) bucket pair a step can be padded to: ``r`` requests
        scheduled means at least ``r`` tokens, so a pair needs ``tokens >`` half of ``requests``."""
        tokens = _powers(MIN_TOKEN_BUCKET, self.max_num_batched_tokens)
        requests = _powers(MIN_REQUEST_BUCKET, self.max_num_seqs)
        return [(t, r) for t in tokens for r in requests if t >= bucket(r // 2 + 1, MIN_TOKEN_BUCKET, self.max_num_batched_tokens)]

    def empty_step(self, tokens: int, requests: int) -> StepInputs:
        """A step of padding only (it writes the null block), to compile a bucket pair."""
        positions = np.full(tokens, -1, np.int32)
        zeros = np.zeros(tokens, np.int32)
        tables = np.zeros((requests, self.blocks_per_request), np.int32)
        return StepInputs(zeros, positions, PagedBatch(positions, zeros, zeros, tables), np.zeros(requests, np.int32), [])

    def prepare(self, out: SchedulerOutput, block_ids: dict[str, list[int]]) -> StepInputs:
        """The scheduled chunks as padded arrays (tokens and requests rounded up to buckets)."""
        tokens = out.num_tokens
        token_bucket = bucket(tokens, MIN_TOKEN_BUCKET, self.max_num_batched_tokens)
        request_bucket = bucket(len(out.chunks), MIN_REQUEST_BUCKET, self.max_num_seqs)
        ids = np.zeros(token_bucket, np.int32)
        positions = np.full(token_bucket, -1, np.int32)
        slots = np.zeros(token_bucket, np.int32)  # padding writes into the null block
        rows = np.zeros(token_bucket, np.int32)
        tables = np.zeros((request_bucket, self.blocks_per_request), np.int32)
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
        sampling = np.zeros(request_bucket, np.int32)
        sampling[: len(sampling_rows)] = sampling_rows
        return StepInputs(ids, positions, PagedBatch(positions, slots, rows, tables), sampling, sampling_ids)

    def run(self, inputs: StepInputs) -> jax.Array:
        """The step on the device: the logits [request bucket, vocab] of the sampling tokens."""
        place = self._forward.placement
        batch = PagedBatch(*(place.put(a, ()) for a in inputs.batch))
        self.pools, logits = self._step(
            self._forward.params, self.pools, place.put(inputs.ids, ()), batch, place.put(inputs.sampling_rows, ())
        )
        return logits

    def _step_program(self, params: Any, pools: Pools, ids: jax.Array, batch: PagedBatch, sampling_rows: jax.Array):
        step = _Step(list(pools), batch, self._forward.placement.mesh, self._heads_axes)
        inputs = {"input_ids": to_traced(ids[None]), "position_ids": to_traced(jnp.maximum(batch.positions, 0)[None])}
        if self._keeps_logits:  # the vocabulary projection of the sampling tokens only
            inputs["logits_to_keep"] = to_traced(sampling_rows)
        logits = self._logits_traced(step, params, inputs)[0]
        return tuple(step.pools), (logits if self._keeps_logits else logits[sampling_rows]).astype(jnp.float32)

    def _logits_traced(self, step: _Step, params: Any, inputs: dict[str, Any]) -> jax.Array:
        """The model's logits on ``inputs`` (no cache) inside a trace, its attention
        layers reading and writing ``step``."""
        token = _current_step.set(step)
        try:
            with _paged_attention_named(self._model.torch_module):
                return self._forward.call_traced(params, {**inputs, "use_cache": False}).logits.jax()
        finally:
            _current_step.reset(token)


def _powers(smallest: int, largest: int) -> list[int]:
    """The buckets from ``smallest`` doubling up to the one holding ``largest``."""
    sizes = [bucket(1, smallest, largest)]
    while sizes[-1] < largest:
        sizes.append(bucket(sizes[-1] + 1, smallest, largest))
    return sizes
