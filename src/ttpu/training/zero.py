"""ZeRO over the mesh: which of parameters, gradients and optimizer state are split over
the data-parallel axes (data, fsdp), expressed as partition specs.

=====  ==========  =====================  ===============
stage  parameters  gradients (in a step)  optimizer state
=====  ==========  =====================  ===============
0      whole       whole (all-reduce)     whole
1      whole       whole                  split
2      whole       split (reduce-scatter) split
3      split       split                  split
=====  ==========  =====================  ===============

"whole" keeps the rules engine's tensor-parallel spec and replicates over the data axes;
"split" also divides the largest dimension that divides by the data-parallel size. A
tensor with no such dimension stays whole (scalars, odd shapes).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection
from dataclasses import dataclass

from ttpu.sharding import ShardingPlan
from ttpu.sharding.mesh import DATA_AXES, MeshShape
from ttpu.sharding.rules import Axis, Spec, split_largest_free


@dataclass(frozen=True)
class ZeroPlan:
    """Specs per parameter name for one ZeRO stage."""

    stage: int
    whole: dict[str, Spec]
    split: dict[str, Spec]

    def parameters(self) -> dict[str, Spec]:
        return self.split if self.stage == 3 else self.whole

    def gradients(self) -> dict[str, Spec]:
        return self.split if self.stage >= 2 else self.whole

    def optimizer_state(self) -> dict[str, Spec]:
        return self.split if self.stage >= 1 else self.whole


def plan_zero(
    plan: ShardingPlan, shapes: dict[str, tuple[int, ...]], stage: int, lookup_tables: Collection[str] = ()
) -> ZeroPlan:
    """The ZeRO specs of every tensor in ``shapes`` (parameters and frozen weights) on
    ``plan``'s mesh. The plan's tensor-axis splits are kept; its data-axis splits (fsdp)
    are replaced by the stage's.

    ``lookup_tables`` (embedding weights, read by row index) are never split along their
    rows: the gradient of a row lookup is a scatter-add, and XLA's SPMD partitioner gave
    wrong sums for a scatter into rows split over the same axis as the batch (measured
    on XLA:CPU, jax 0.10.2); they are split along a column dimension instead."""
    whole, split = {}, {}
    entry = data_entry(plan.mesh)
    for name, shape in shapes.items():
        found = plan.parameters.get(name)
        spec = tuple(found.spec) if found else (None,) * len(shape)
        whole[name] = tuple(_without_data_axes(axis) for axis in spec)
        exclude = (0,) if name in lookup_tables else ()
        split[name] = (
            split_largest_free(whole[name], shape, entry, plan.mesh.split(entry), exclude) if entry else whole[name]
        )
    return ZeroPlan(stage, whole, split)


def placement_plan(plan: ShardingPlan, zero: ZeroPlan) -> ShardingPlan:
    """``plan`` with each parameter placed where the ZeRO stage keeps it."""
    specs = zero.parameters()
    parameters = {
        name: dataclasses.replace(p, spec=specs[name], source=f"{p.source}; zero-{zero.stage}")
        for name, p in plan.parameters.items() if name in specs
    }
    return dataclasses.replace(plan, parameters={**plan.parameters, **parameters})


def data_entry(mesh: MeshShape) -> Axis:
    """The data axes of ``mesh`` (those larger than 1) as one spec entry."""
    axes = tuple(axis for axis in DATA_AXES if mesh.size(axis) > 1)
    return axes if len(axes) > 1 else (axes[0] if axes else None)


def _without_data_axes(axis: Axis) -> Axis:
    if isinstance(axis, tuple):
        kept = tuple(a for a in axis if a not in DATA_AXES)
        return kept if len(kept) > 1 else (kept[0] if kept else None)
    return None if axis in DATA_AXES else axis
