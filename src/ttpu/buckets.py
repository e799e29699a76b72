"""Shape buckets: pad batch and sequence so that nearby shapes share one executable.

Sequence inputs are padded on the right (causal models never look right; padding is
masked out for the rest) and the batch is padded by repeating its last row. After the
call, outputs are cut back to the real batch and sequence.

Which output axes follow the batch and the sequence is learned, not guessed from names:
the forward's output shapes are evaluated (traced, not compiled) once for a batch one
larger and a sequence one shorter, and the axes whose sizes move by exactly that much
are the ones that get cut (keeping any constant offset, such as a prepended class
token). Output axes that depend on the padded shapes in any other way (for example a
flattened batch*sequence axis) are returned padded.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from transformers.cache_utils import Cache

# input name -> pad value along the sequence axis (None: repeat the last position)
SEQUENCE_PAD_VALUES: dict[str, int | None] = {
    "input_ids": 0,  # replaced by the model's pad token id when it has one
    "attention_mask": 0,
    "token_type_ids": 0,
    "position_ids": None,
    "labels": -100,
    "inputs_embeds": 0,
}
# batch padding: padded rows repeat the last row, except these values
BATCH_PAD_VALUES: dict[str, int] = {"labels": -100}


def powers_of_two(start: int, stop: int) -> tuple[int, ...]:
    sizes, size = [], start
    while size <= stop:
        sizes.append(size)
        size *= 2
    return tuple(sizes)


@dataclass(frozen=True)
class BucketPolicy:
    """Sizes that batch and sequence lengths are rounded up to (None disables)."""

    sequence: Sequence[int] | None = field(default_factory=lambda: powers_of_two(16, 1 << 20))
    batch: Sequence[int] | None = field(default_factory=lambda: powers_of_two(1, 1 << 16))

    def batch_multiple_of(self, multiple: int) -> BucketPolicy:
        """The same policy with batch buckets rounded up to multiples of ``multiple`` (the
        data-parallel device count, so that a batch splits evenly over the devices)."""
        if not self.batch or multiple == 1:
            return self
        sizes = sorted({-(-size // multiple) * multiple for size in self.batch})
        return BucketPolicy(sequence=self.sequence, batch=tuple(sizes))

    def round_up(self, size: int, sizes: Sequence[int] | None, limit: int | None = None) -> int:
        if not sizes:
            return size
        padded = next((s for s in sorted(sizes) if s >= size), size)
        return size if limit is not None and padded > limit else padded


@dataclass(frozen=True)
class PaddedInputs:
    arrays: dict[str, Any]
    batch: int
    padded_batch: int
    sequence: int | None
    padded_sequence: int | None

    @property
    def is_padded(self) -> bool:
        return self.batch != self.padded_batch or self.sequence != self.padded_sequence


def pad_inputs(
    arrays: Mapping[str, Any],
    policy: BucketPolicy,
    *,
    pad_token_id: int | None,
    pad_sequence: bool,
    max_sequence: int | None,
) -> PaddedInputs:
    """Pad array inputs to their buckets (pad_sequence: the model takes a padding mask)."""
    arrays = dict(arrays)
    plain = {k: v for k, v in arrays.items() if _is_plain_array(v)}
    batch_sizes = {v.shape[0] for v in plain.values() if v.ndim > 0}
    if len(batch_sizes) != 1 or len(plain) != len(arrays):
        return PaddedInputs(arrays, 0, 0, None, None)
    batch = batch_sizes.pop()
    sequence = padded_sequence = None
    main = plain.get("input_ids", plain.get("inputs_embeds"))
    if pad_sequence and main is not None:
        sequence = main.shape[1]
        padded_sequence = policy.round_up(sequence, policy.sequence, max_sequence)
        if "attention_mask" not in arrays:
            xp = array_namespace(main)
            arrays["attention_mask"] = xp.ones((batch, sequence), dtype=xp.int32)
        for name, fill in SEQUENCE_PAD_VALUES.items():
            value = arrays.get(name)
            if value is not None and value.ndim >= 2 and value.shape[1] == sequence:
                if name == "input_ids" and pad_token_id is not None:
                    fill = pad_token_id
                arrays[name] = _pad_axis(value, 1, padded_sequence, fill)
    padded_batch = policy.round_up(batch, policy.batch)
    if padded_batch != batch:
        for name, value in arrays.items():
            arrays[name] = _pad_axis(value, 0, padded_batch, BATCH_PAD_VALUES.get(name))
    return PaddedInputs(arrays, batch, padded_batch, sequence, padded_sequence)


def array_namespace(value: Any) -> Any:
    """numpy for numpy arrays, jax.numpy for jax arrays (the array API's namespace)."""
    return value.__array_namespace__() if hasattr(value, "__array_namespace__") else np


def _is_plain_array(value: Any) -> bool:
    return hasattr(value, "shape") and hasattr(value, "dtype") and not isinstance(value, Cache)


def _pad_axis(value: Any, axis: int, size: int, fill: int | None) -> Any:
    extra = size - value.shape[axis]
    if extra <= 0:
        return value
    xp = array_namespace(value)
    widths = [(0, 0)] * value.ndim
    widths[axis] = (0, extra)
    if fill is None:
        return xp.pad(value, widths, mode="edge")
    return xp.pad(value, widths, constant_values=xp.asarray(fill, dtype=value.dtype))


SEQUENCE_PROBE_DELTA = -1
BATCH_PROBE_DELTA = 1


def probe_shapes(padded: PaddedInputs) -> dict[str, np.ndarray]:
    """Inputs with a batch one larger and a sequence one shorter (zeros: only their shapes
    are used, by a trace that does not run)."""
    shapes = {}
    for name, value in padded.arrays.items():
        shape = list(value.shape)
        shape[0] += BATCH_PROBE_DELTA
        if padded.padded_sequence and value.ndim >= 2 and shape[1] == padded.padded_sequence:
            if name in SEQUENCE_PAD_VALUES:
                shape[1] += SEQUENCE_PROBE_DELTA
        shapes[name] = np.zeros(tuple(shape), np.dtype(value.dtype))
    return shapes


def padded_axes(
    padded: PaddedInputs, actual: list[Any], probe: list[Any]
) -> list[tuple[tuple[int, int, int], ...]]:
    """For each output leaf (of the real and the probe output), the (axis, kind, offset)
    triples to cut.

    kind 0 follows the batch, kind 1 the sequence; ``offset`` is the axis size minus the
    padded size (e.g. +1 for a prepended class token), kept when cutting. Leaves that are
    not arrays (a cache object, on backends whose pytrees keep it whole) are left as they are.
    """
    result = []
    for real, moved in zip(actual, probe):
        axes = []
        if hasattr(real, "ndim") and hasattr(moved, "ndim") and real.ndim == moved.ndim:
            for axis, (a, b) in enumerate(zip(real.shape, moved.shape)):
                if b - a == BATCH_PROBE_DELTA:
                    axes.append((axis, 0, a - padded.padded_batch))
                elif b - a == SEQUENCE_PROBE_DELTA and padded.padded_sequence:
                    axes.append((axis, 1, a - padded.padded_sequence))
        result.append(tuple(axes))
    return result


def unpad_outputs(
    padded: PaddedInputs, leaves: list[Any], axes: list[tuple[tuple[int, int, int], ...]]
) -> list[Any]:
    """Cut every padded axis of the output's leaves back to the real batch and sequence."""
    sizes = (padded.batch, padded.sequence)
    cut = []
    for leaf, leaf_axes in zip(leaves, axes):
        if not leaf_axes:
            cut.append(leaf)
            continue
        index = [slice(None)] * leaf.ndim
        for axis, kind, offset in leaf_axes:
            index[axis] = slice(0, sizes[kind] + offset)
        cut.append(leaf[tuple(index)])
    return cut
