"""Mesh shapes: named axes and their sizes, independent of any backend.

ttpu's meshes use up to three axes, always in this order:

- ``data``: data parallelism, parameters replicated, the batch split;
- ``fsdp``: fully sharded data parallelism, the batch split and every parameter too;
- ``tensor``: tensor (model) parallelism, layers split Megatron-style, the batch replicated.

A backend turns a :class:`MeshShape` into its own mesh over all (global) devices.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from ttpu.errors import InvalidArgumentError

AXES = ("data", "fsdp", "tensor")
DATA_AXES = ("data", "fsdp")  # the axes the batch is split over


@dataclass(frozen=True)
class MeshShape:
    """Axis names and sizes, e.g. ``MeshShape((("fsdp", 4), ("tensor", 2)))``."""

    axes: tuple[tuple[str, int], ...]

    @classmethod
    def from_mapping(cls, sizes: Mapping[str, int], device_count: int) -> MeshShape:
        """Check a user's ``{"data": 2, "fsdp": 2, "tensor": 2}`` against the devices."""
        if not isinstance(sizes, Mapping) or not sizes:
            raise InvalidArgumentError(
                f"mesh must be a dict of axis sizes such as {{'fsdp': 4, 'tensor': 2}} (got {sizes!r}); "
                f"valid axes: {', '.join(AXES)}."
            )
        unknown = [name for name in sizes if name not in AXES]
        if unknown:
            raise InvalidArgumentError(f"unknown mesh axis {unknown}; valid axes: {', '.join(AXES)}.")
        bad = {k: v for k, v in sizes.items() if not isinstance(v, int) or isinstance(v, bool) or v < 1}
        if bad:
            raise InvalidArgumentError(f"mesh axis sizes must be positive integers (got {bad}).")
        shape = cls(tuple((name, sizes[name]) for name in AXES if name in sizes))
        if shape.device_count != device_count:
            raise InvalidArgumentError(
                f"the mesh {shape} has {shape.device_count} devices but {device_count} are available; "
                f"the product of the axis sizes must equal the device count ({device_count})."
            )
        return shape

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.axes)

    @property
    def sizes(self) -> tuple[int, ...]:
        return tuple(size for _, size in self.axes)

    @property
    def device_count(self) -> int:
        return math.prod(self.sizes)

    def size(self, axis: str) -> int:
        """The axis' size (1 for an axis the mesh does not have)."""
        return dict(self.axes).get(axis, 1)

    def split(self, entry: str | tuple[str, ...] | None) -> int:
        """How many ways one entry of a partition spec splits its dimension: an axis,
        a tuple of axes, or None (not split)."""
        axes = entry if isinstance(entry, tuple) else (entry,) if entry else ()
        return math.prod(self.size(axis) for axis in axes)

    @property
    def data_parallel_size(self) -> int:
        """How many ways the batch can be split (the data axes' sizes multiplied)."""
        return self.split(DATA_AXES)

    def __str__(self) -> str:
        return "{" + ", ".join(f"{name}: {size}" for name, size in self.axes) + "}"
