"""The KV cache of compiled generation: fixed-size jax arrays, seen by the model as a
transformers ``Cache``.

The state that crosses ``jax.jit`` boundaries is :class:`KVState` (plain arrays: one
key and one value array per layer plus the number of positions written). Inside a traced
step it is wrapped as :class:`TracedStaticCache`, a transformers ``Cache`` built from
``StaticLayer`` objects, and handed to the model as its cache argument: the model writes
its new keys and values through the cache's own ``update`` (an in-place ``index_copy_``
that torchax turns into a functional update), and the updated arrays are read back out.

Every layer holds the full length, sliding-window and chunked layers too: the write
position is a traced value (one executable serves every step), and the masks
transformers builds from the window size and absolute positions keep those layers exact.
transformers' own sliding layers are ring buffers driven by a Python counter, which would
compile once per step.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import torch
from transformers.cache_utils import Cache, CacheLayerMixin, StaticLayer

from ttpu.backends.jax.environment import to_traced
from ttpu.backends.jax.executables import Executables
from ttpu.backends.jax.placement import Placement
from ttpu.backends.jax.program_store import ProgramStore
from ttpu.compat import CACHE_OUTPUT
from ttpu.errors import InvalidArgumentError


class KVState(NamedTuple):
    """Keys and values of every layer, [batch, kv_heads, max_length, head_dim] each, and
    how many positions have been written (a scalar shared by all rows: prompts are
    left-padded to one length)."""

    keys: tuple[jax.Array, ...]
    values: tuple[jax.Array, ...]
    length: jax.Array


class LayerShape(NamedTuple):
    kv_heads: int
    key_dim: int
    value_dim: int
    sliding: bool


class CacheLayout(NamedTuple):
    """Per-layer cache shapes of a model and the cache dtype."""

    layers: tuple[LayerShape, ...]
    dtype: Any

    @property
    def sliding(self) -> tuple[bool, ...]:
        return tuple(layer.sliding for layer in self.layers)

    def shapes(self, batch: int, max_length: int) -> tuple[list[tuple[int, ...]], list[tuple[int, ...]]]:
        """Shapes of every layer's keys and values."""
        keys = [(batch, l.kv_heads, max_length, l.key_dim) for l in self.layers]
        values = [(batch, l.kv_heads, max_length, l.value_dim) for l in self.layers]
        return keys, values

    def empty(self, batch: int, max_length: int, placement: Placement) -> KVState:
        """A zeroed cache for ``batch`` sequences of up to ``max_length`` positions, each
        array created directly in its sharded layout."""
        keys, values = self.shapes(batch, max_length)
        key_shardings, value_shardings = placement.kv_cache_shardings(keys), placement.kv_cache_shardings(values)
        return KVState(
            tuple(jnp.zeros(shape, self.dtype, device=s) for shape, s in zip(keys, key_shardings)),
            tuple(jnp.zeros(shape, self.dtype, device=s) for shape, s in zip(values, value_shardings)),
            jnp.zeros((), jnp.int32, device=placement.replicated),
        )

    @staticmethod
    def constrained(state: KVState, placement: Placement) -> KVState:
        """``state`` kept in the cache's sharded layout inside a traced program."""
        keys = placement.kv_cache_shardings([k.shape for k in state.keys])
        values = placement.kv_cache_shardings([v.shape for v in state.values])
        return KVState(
            tuple(jax.lax.with_sharding_constraint(k, s) for k, s in zip(state.keys, keys)),
            tuple(jax.lax.with_sharding_constraint(v, s) for v, s in zip(state.values, values)),
            state.length,
        )


def probe_layout(call_traced: Callable[[Any, dict], Any], params: Any, store: ProgramStore | None) -> CacheLayout:
    """Learn the cache layout by tracing (not running) one token through the model with
    transformers' default cache: heads, head sizes and dtype per layer as the model
    really produces them (latent attention, shared heads and config quirks included).
    ``call_traced(params, inputs)`` is the backend's traced forward; with a ``store``, a
    later process reads the layout back instead of tracing."""

    def one_token(params: Any, ids: jax.Array) -> list[dict[str, tuple[jax.Array, jax.Array]]]:
        inputs = {"input_ids": to_traced(ids), "use_cache": True}
        cache = output_cache(call_traced(params, inputs))
        _refuse_unsupported_layers(cache)
        # Each layer's kind is part of the result's structure, so it is stored with it.
        return [
            {"sliding" if sliding else "full": (layer.keys.jax(), layer.values.jax())}
            for layer, sliding in zip(cache.layers, cache.is_sliding)
        ]

    probe = Executables(one_token, name="cache_layout", store=store)
    layers = probe.output_shapes(params, jax.ShapeDtypeStruct((1, 1), jnp.int32))
    shapes = [next(iter(layer.items())) for layer in layers]
    return CacheLayout(
        tuple(LayerShape(k.shape[1], k.shape[-1], v.shape[-1], kind == "sliding") for kind, (k, v) in shapes),
        shapes[0][1][0].dtype,
    )


def output_cache(output: Any) -> Cache:
    """The ``Cache`` a forward returned, with a clear error for models that return none."""
    cache = getattr(output, CACHE_OUTPUT, None)
    if not isinstance(cache, Cache):
        raise InvalidArgumentError(
            f"generate() needs a model that returns a transformers Cache; "
            f"{type(output).__name__} has {CACHE_OUTPUT}={type(cache).__name__}."
        )
    return cache


def _refuse_unsupported_layers(cache: Cache) -> None:
    # Caches before transformers 5.23 know no linear or dummy (shared-KV) layers.
    no_layers = [False] * len(cache.layers)
    linear, dummy = getattr(cache, "is_linear", no_layers), getattr(cache, "is_dummy", no_layers)
    odd = sorted(
        {
            type(layer).__name__
            for layer, is_linear, is_dummy in zip(cache.layers, linear, dummy)
            if is_linear or is_dummy or not isinstance(layer, CacheLayerMixin)
        }
    )
    if odd:
        raise InvalidArgumentError(
            f"generate() supports decoders whose every layer caches attention keys and values; "
            f"this model also has {odd} cache layers (recurrent, linear-attention or shared KV). "
            "Call the model directly (model(...)) for its forward pass."
        )


class TracedStaticLayer(StaticLayer):
    """A ``StaticLayer`` over traced arrays, already initialised; transformers' own
    ``update`` writes into it at the traced position ``cumulative_length``.

    ``empty``: known at trace time to hold nothing yet (the prefill). Attention then runs
    over the new keys and values only, not the whole (still empty) cache length.
    """

    def __init__(
        self, keys: torch.Tensor, values: torch.Tensor, length: torch.Tensor, sliding: bool, empty: bool
    ):
        super().__init__(max_cache_len=keys.shape[2])
        self.is_sliding = sliding
        self.empty = empty
        self.keys, self.values = keys, values
        self.cumulative_length = length
        self.dtype, self.device = keys.dtype, keys.device
        self.batch_size, self.num_heads = keys.shape[:2]
        self.k_head_dim, self.v_head_dim = keys.shape[-1], values.shape[-1]
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any):
        keys, values = super().update(key_states, value_states, *args, **kwargs)
        return (key_states, value_states) if self.empty else (keys, values)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return (query_length, 0) if self.empty else super().get_mask_sizes(query_length)


class TracedStaticCache(Cache):
    """A transformers ``Cache`` over a :class:`KVState`, for use inside a traced step."""

    def __init__(self, state: KVState, layout: CacheLayout, empty: bool = False) -> None:
        layers = [
            # Each layer counts its own writes, as transformers' layers do.
            TracedStaticLayer(*to_traced((k, v, state.length)), sliding, empty)
            for k, v, sliding in zip(state.keys, state.values, layout.sliding)
        ]
        super().__init__(layers=layers)
        self._start = state.length

    def state(self, written: int) -> KVState:
        """The arrays after the model ran, ``written`` more positions filled."""
        return KVState(
            tuple(layer.keys.jax() for layer in self.layers),
            tuple(layer.values.jax() for layer in self.layers),
            self._start + written,
        )
