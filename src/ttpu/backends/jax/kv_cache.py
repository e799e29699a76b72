"""The cache of compiled generation: fixed-size jax arrays, seen by the model as a
transformers ``Cache``.

The state that crosses ``jax.jit`` boundaries is :class:`CacheState`: per layer a dict
of plain arrays, and the number of positions written. What a layer holds depends on the
kind of layer transformers' own cache gives it (learnt once by :func:`probe_layout`):

* attention layers (full, sliding, chunked): ``keys`` and ``values``
  [batch, kv_heads, max_length, head_dim], written at the traced position;
* sparse-attention layers with an indexer (DSA): also ``indexer`` [batch, max_length, dim];
* linear-attention, SSM and short-convolution layers (mamba, gated delta net, conv):
  ``conv.<i>`` and ``recurrent.<i>`` per state index, fixed-size states that the model
  replaces at every step;
* hybrid layers: both attention arrays and linear states;
* dummy layers (shared-KV or attention-free layers): nothing;
* attention layers a token-only forward never writes (Mllama's cross-attention without
  an image): transformers' empty layer, as in its default cache, and a marker array.

Inside a traced step the state is wrapped as :class:`TracedCache`, a transformers
``Cache`` whose layers are transformers' own layer classes over traced arrays, already
initialised: the model writes through their ``update`` / ``update_conv_state`` /
``update_recurrent_state`` / ``update_indexer`` (in-place tensor updates that torchax
turns into functional ones), and the updated arrays are read back out.

Every attention layer holds the full length, sliding-window and chunked layers too: the
write position is a traced value (one executable serves every step), and the masks
transformers builds from the window size and absolute positions keep those layers exact.
transformers' own sliding layers are ring buffers driven by a Python counter, which would
compile once per step.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import torch
from transformers.cache_utils import (
    Cache,
    CacheLayerMixin,
    DynamicLayer,
    LinearAttentionCacheLayerMixin,
    LinearAttentionLayer,
    StaticLayer,
)

from ttpu.backends.jax.environment import to_traced
from ttpu.backends.jax.executables import Executables
from ttpu.backends.jax.placement import Placement
from ttpu.backends.jax.program_store import ProgramStore
from ttpu.compat import CACHE_OUTPUT, DummyLayer
from ttpu.errors import CompilationError, InvalidArgumentError

LENGTH = -1  # in an array layout: the axis of cache positions
KEYS, VALUES, INDEXER = "keys", "values", "indexer"
UNWRITTEN = "unwritten"  # a marker: an attention layer no forward writes (stays transformers' empty layer)
CONV, RECURRENT = "conv", "recurrent"  # names "conv.<state index>", "recurrent.<state index>"


class ArrayLayout(NamedTuple):
    """One cache array of a layer: its shape without the batch (``LENGTH`` where the
    cache length goes) and dtype."""

    shape: tuple[int, ...]
    dtype: str

    def full_shape(self, batch: int, max_length: int) -> tuple[int, ...]:
        return (batch, *(max_length if d == LENGTH else d for d in self.shape))


class LayerLayout(NamedTuple):
    """One layer's cache arrays by name, and whether its attention is a sliding window."""

    arrays: tuple[tuple[str, ArrayLayout], ...]
    sliding: bool

    @property
    def names(self) -> frozenset[str]:
        return frozenset(name for name, _ in self.arrays)

    def state_indices(self, kind: str) -> list[int]:
        return sorted(int(name.split(".")[1]) for name in self.names if name.startswith(kind + "."))


class CacheState(NamedTuple):
    """Every layer's cache arrays and how many positions have been written (a scalar
    shared by all rows: prompts are left-padded to one length)."""

    layers: tuple[dict[str, jax.Array], ...]
    length: jax.Array


class CacheLayout(NamedTuple):
    """Per-layer cache layout of a model. ``recompute``, when set, says why generation
    cannot carry this dense cache for it (the forward returns none, the model keeps a
    cache class of its own, its cached step reads a traced value in Python): each step
    then runs the forward over the whole sequence, unless the paged step (which gives
    the model no cache object) carries the ``layers`` the model's own cache showed
    (kept when only the dense cached step failed)."""

    layers: tuple[LayerLayout, ...]
    recompute: str = ""

    def describe(self) -> str:
        """What the compiled loop carries per layer, for ``ttpu doctor``."""
        if self.recompute:
            kept = f" (the model's cache has {self._kinds()}, which a paged step may carry)" if self.layers else ""
            return f"none: {self.recompute}; each step recomputes the whole sequence (O(length) per token){kept}"
        return self._kinds()

    def _kinds(self) -> str:
        """The layers counted by kind ("2 full attention layers")."""
        counts: dict[str, int] = {}
        for layer in self.layers:
            attention, linear = KEYS in layer.names, any(n.startswith((CONV, RECURRENT)) for n in layer.names)
            kind = "hybrid" if attention and linear else "linear-attention/SSM" if linear else (
                "unwritten attention" if UNWRITTEN in layer.names else "dummy" if not attention
                else "sliding attention" if layer.sliding else "full attention"
            )
            kind += " + indexer" if INDEXER in layer.names else ""
            counts[kind] = counts.get(kind, 0) + 1
        return ", ".join(f"{n} {kind}" for kind, n in counts.items()) + " layers"

    def empty(self, batch: int, max_length: int, placement: Placement | None) -> CacheState:
        """A zeroed cache for ``batch`` sequences of up to ``max_length`` positions, each
        array created directly in its sharded layout (unplaced inside a trace: ``None``)."""
        layers = []
        for layer in () if self.recompute else self.layers:  # recomputing carries none
            arrays = {}
            for name, array in layer.arrays:
                shape = array.full_shape(batch, max_length)
                device = placement and _sharding(name, shape, placement)
                arrays[name] = jnp.zeros(shape, array.dtype, device=device)
            layers.append(arrays)
        return CacheState(tuple(layers), jnp.zeros((), jnp.int32, device=placement and placement.replicated))

    @staticmethod
    def constrained(state: CacheState, placement: Placement) -> CacheState:
        """``state`` kept in the cache's sharded layout inside a traced program."""
        layers = tuple(
            {name: jax.lax.with_sharding_constraint(a, _sharding(name, a.shape, placement)) for name, a in layer.items()}
            for layer in state.layers
        )
        return CacheState(layers, state.length)


def _sharding(name: str, shape: tuple[int, ...], placement: Placement) -> jax.sharding.NamedSharding:
    """Attention keys and values over batch and heads (the plan's KV-cache rule); the
    other arrays over the batch only."""
    if name in (KEYS, VALUES):
        return placement.sharding(placement.plan.kv_cache_spec(shape))
    return placement.sharding(placement.plan.batch_spec(shape))


DecodeStep = Callable[[Any, CacheState, CacheLayout], Any]  # (params, cache, layout) -> logits, traced


def probe_layout(
    call_traced: Callable[[Any, dict], Any], params: Any, store: ProgramStore | None, decode_step: DecodeStep
) -> CacheLayout:
    """Learn the cache layout by tracing (not running) one token through the model with
    transformers' default cache: the kind of every layer and the shapes and dtypes of its
    arrays as the model really produces them (latent attention, shared heads, state
    sizes and config quirks included). Then trace ``decode_step`` over that layout, so
    a model whose cached step cannot be compiled is known before generating.
    ``call_traced(params, inputs)`` is the backend's traced forward; with a ``store``, a
    later process reads the layout back instead of tracing."""

    def probe(params: Any, ids: jax.Array) -> dict[str, Any]:
        inputs = {"input_ids": to_traced(ids), "use_cache": True}
        cache = getattr(call_traced(params, inputs), CACHE_OUTPUT, None)
        if not isinstance(cache, Cache):
            return _recompute("the forward returns no cache")  # BERT-style LM heads, GPT-1, RWKV's own state ...
        own = [type(c).__name__ for c in (cache, *cache.layers) if type(c).__module__ != Cache.__module__]
        if own:
            return _recompute(f"the model keeps a cache of its own ({own[0]})")
        # Each layer's kind is in the names of its arrays, so it is stored with them.
        layers = [_layer_arrays(layer, index) for index, layer in enumerate(cache.layers)]
        layout = CacheLayout(tuple(_layer_layout(arrays) for arrays in layers))
        try:
            decode_step(params, layout.empty(1, 2, None), layout)
        except CompilationError as exc:
            if not isinstance(exc.__cause__, jax.errors.ConcretizationTypeError):
                raise
            where = [line.split(": ", 1)[1] for line in str(exc).splitlines() if "failing line:" in line]
            reason = f"its cached step reads a traced value in Python ({', '.join(where[:1])})"
            return {**_recompute(reason), "layers": layers}
        return {"layers": layers}

    found = Executables(probe, name="cache_layout", store=store).output_shapes(
        params, jax.ShapeDtypeStruct((1, 1), jnp.int32)
    )
    layers = tuple(_layer_layout(layer) for layer in found.get("layers", ()))
    return CacheLayout(layers, recompute=next(iter(found.get("recompute", [""]))))


def _recompute(reason: str) -> dict[str, Any]:
    """The probe's answer for a model generation runs without a cache: the reason is the
    output's only key, so the program store keeps it with the (empty) shapes."""
    return {"recompute": {reason: jnp.zeros((), jnp.int8)}}


def _layer_arrays(layer: Any, index: int) -> dict[str, jax.Array]:
    """The arrays one layer of transformers' default cache holds after one token, by name
    (attention arrays prefixed ``sliding:`` for sliding-window layers)."""
    if DummyLayer is not None and isinstance(layer, DummyLayer):
        return {}
    arrays = {}
    if isinstance(layer, LinearAttentionCacheLayerMixin):
        for i in range(layer.number_of_states):
            if layer.is_conv_states_initialized[i]:
                arrays[f"{CONV}.{i}"] = layer.conv_states[i].jax()
            if layer.is_recurrent_states_initialized[i]:
                arrays[f"{RECURRENT}.{i}"] = layer.recurrent_states[i].jax()
    if isinstance(layer, CacheLayerMixin):
        if getattr(layer, "keys", None) is None or getattr(layer, "values", None) is None:
            if not arrays:  # never written (Mllama's cross-attention without an image)
                return {UNWRITTEN: jnp.zeros((1,), jnp.int8)}
            raise InvalidArgumentError(f"cache layer {index} ({type(layer).__name__}) holds no keys after a forward")
        prefix = "sliding:" if getattr(layer, "is_sliding", False) else ""
        arrays[prefix + KEYS], arrays[prefix + VALUES] = layer.keys.jax(), layer.values.jax()
        if getattr(layer, "indexer_keys", None) is not None:
            arrays[INDEXER] = layer.indexer_keys.jax()
    if not arrays:
        raise InvalidArgumentError(
            f"generate() does not know cache layer {index}'s kind ({type(layer).__name__}); ttpu's compiled "
            "generation handles transformers' attention, indexed, linear-attention/SSM, hybrid and dummy "
            "layers. Call the model directly (model(...)) for its forward pass."
        )
    return arrays


def _layer_layout(arrays: Mapping[str, jax.ShapeDtypeStruct]) -> LayerLayout:
    """A layer's layout from the one-token arrays of the probe: attention arrays
    [1, heads, 1, dim] and indexer keys [1, 1, dim] grow along the length."""
    layout, sliding = [], False
    for name, array in sorted(arrays.items()):
        sliding = sliding or name.startswith("sliding:")
        name = name.removeprefix("sliding:")
        shape = tuple(array.shape[1:])
        if name in (KEYS, VALUES):
            shape = (shape[0], LENGTH, shape[2])
        elif name == INDEXER:
            shape = (LENGTH, shape[1])
        layout.append((name, ArrayLayout(shape, str(array.dtype))))
    return LayerLayout(tuple(layout), sliding)


class TracedStaticLayer(StaticLayer):
    """A ``StaticLayer`` over traced arrays, already initialised; transformers' own
    ``update`` writes into it at the traced position ``cumulative_length``.

    ``empty``: known at trace time to hold nothing yet (the prefill). Attention then runs
    over the new keys and values only, not the whole (still empty) cache length. An
    ``indexer`` array (sparse attention) is written at the same positions.
    """

    def __init__(self, arrays: Mapping[str, torch.Tensor], length: torch.Tensor, sliding: bool, empty: bool):
        keys, values = arrays[KEYS], arrays[VALUES]
        super().__init__(max_cache_len=keys.shape[2])
        self.is_sliding = sliding
        self.empty = empty
        self.keys, self.values = keys, values
        self.cumulative_length = length
        self.dtype, self.device = keys.dtype, keys.device
        self.batch_size, self.num_heads = keys.shape[:2]
        self.k_head_dim, self.v_head_dim = keys.shape[-1], values.shape[-1]
        self.is_initialized = True
        self.indexer_keys = arrays.get(INDEXER)
        self.indexer_position_ids = None
        # Where this step's indexer keys go: the attention update (called first) moves
        # cumulative_length on, in place.
        self.indexer_start = length.jax()

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any):
        keys, values = super().update(key_states, value_states, *args, **kwargs)
        return (key_states, value_states) if self.empty else (keys, values)

    def update_indexer(self, indexer_key_states: torch.Tensor) -> torch.Tensor:
        """Write the new indexer keys at the positions the keys went to (the prefill
        sees the new ones only, as for keys and values)."""
        if self.indexer_keys is None:
            raise InvalidArgumentError("update_indexer on a layer whose cache layout has no indexer keys")
        positions = torch.arange(indexer_key_states.shape[1], device=self.device) + to_traced(self.indexer_start)
        self.indexer_keys.index_copy_(1, positions, indexer_key_states)
        return indexer_key_states if self.empty else self.indexer_keys

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return (query_length, 0) if self.empty else super().get_mask_sizes(query_length)


class TracedLinearLayer(LinearAttentionLayer):
    """A linear-attention / SSM / convolution layer over traced states, already
    initialised; ``empty`` (the prefill) means no previous state, as transformers'
    layer says before its first update."""

    def __init__(self, arrays: Mapping[str, torch.Tensor], layout: LayerLayout, empty: bool):
        conv, recurrent = layout.state_indices(CONV), layout.state_indices(RECURRENT)
        LinearAttentionLayer.__init__(self, number_of_states=max([*conv, *recurrent]) + 1)
        for i in conv:
            self.conv_states[i] = arrays[f"{CONV}.{i}"]
            self.conv_kernel_size[i] = self.conv_states[i].shape[-1]
            self.is_conv_states_initialized[i] = True
            self.has_previous_state[i] = not empty
        for i in recurrent:
            self.recurrent_states[i] = arrays[f"{RECURRENT}.{i}"]
            self.is_recurrent_states_initialized[i] = True
            self.has_previous_state[i] = not empty
        first = self.conv_states.get(conv[0]) if conv else self.recurrent_states[recurrent[0]]
        self.dtype, self.device = first.dtype, first.device

    def linear_arrays(self) -> dict[str, torch.Tensor]:
        arrays = {f"{CONV}.{i}": s for i, s in self.conv_states.items() if self.is_conv_states_initialized[i]}
        arrays.update({f"{RECURRENT}.{i}": s for i, s in self.recurrent_states.items() if self.is_recurrent_states_initialized[i]})
        return arrays


class TracedHybridLayer(TracedLinearLayer, TracedStaticLayer):
    """A layer with both linear states and attention keys and values (transformers'
    ``LinearAttentionAnd*AttentionLayer``)."""

    def __init__(self, arrays: Mapping[str, torch.Tensor], layout: LayerLayout, length: torch.Tensor, empty: bool):
        TracedStaticLayer.__init__(self, arrays, length, layout.sliding, empty)
        TracedLinearLayer.__init__(self, arrays, layout, empty)

    get_seq_length = TracedStaticLayer.get_seq_length  # its keys' length, not the linear count transformers 5.25 keeps


class UnwrittenLayer(DynamicLayer):
    """transformers' empty attention layer (not initialised), as the default cache has it
    for a layer no text-only forward writes; carries its marker array through the loop."""

    def __init__(self, marker: torch.Tensor) -> None:
        super().__init__()
        self.marker = marker

    def update(self, *args: Any, **kwargs: Any) -> Any:
        raise InvalidArgumentError(
            "an attention layer that a text-only forward leaves empty (cross-attention) was written: "
            "ttpu's compiled generate() takes token inputs only (no images or encoder states yet)"
        )


class TracedCache(Cache):
    """A transformers ``Cache`` over a :class:`CacheState`, for use inside a traced step."""

    def __init__(self, state: CacheState, layout: CacheLayout, empty: bool = False) -> None:
        layers: list[Any] = []
        for arrays, layer in zip(state.layers, layout.layers):
            # Each attention layer counts its own writes, as transformers' layers do.
            traced = {name: to_traced(a) for name, a in arrays.items()}
            attention = KEYS in layer.names
            linear = bool(layer.state_indices(CONV) or layer.state_indices(RECURRENT))
            if attention and linear:
                layers.append(TracedHybridLayer(traced, layer, to_traced(state.length), empty))
            elif attention:
                layers.append(TracedStaticLayer(traced, to_traced(state.length), layer.sliding, empty))
            elif linear:
                layers.append(TracedLinearLayer(traced, layer, empty))
            elif UNWRITTEN in layer.names:
                layers.append(UnwrittenLayer(traced[UNWRITTEN]))
            else:
                layers.append(DummyLayer())
        super().__init__(layers=layers)
        self._start = state.length

    def state(self, written: int) -> CacheState:
        """The arrays after the model ran, ``written`` more positions filled."""
        layers = []
        for layer in self.layers:
            arrays: dict[str, Any] = {}
            if isinstance(layer, TracedLinearLayer):
                arrays.update(layer.linear_arrays())
            if isinstance(layer, UnwrittenLayer):
                arrays[UNWRITTEN] = layer.marker
            if isinstance(layer, TracedStaticLayer):
                arrays[KEYS], arrays[VALUES] = layer.keys, layer.values
                if layer.indexer_keys is not None:
                    arrays[INDEXER] = layer.indexer_keys
            layers.append({name: a.jax() for name, a in arrays.items()})
        return CacheState(tuple(layers), self._start + written)
