"""``describe_sharding``: a table of where a model's weights live."""

from __future__ import annotations

import math
from dataclasses import dataclass

from ttpu.sharding.plan import ShardingPlan
from ttpu.sharding.rules import Spec


@dataclass(frozen=True)
class ShardRow:
    name: str
    shape: tuple[int, ...]
    spec: Spec
    source: str
    bytes_per_device: int


@dataclass(frozen=True)
class ShardingTable:
    """One row per parameter; ``str()`` (or the REPL) shows it as a table."""

    plan: ShardingPlan
    rows: tuple[ShardRow, ...]
    total_bytes: int

    @property
    def bytes_per_device(self) -> int:
        """Parameter bytes each device holds."""
        return sum(row.bytes_per_device for row in self.rows)

    def __str__(self) -> str:
        header = ("parameter", "shape", "spec", "from", "bytes/device")
        lines = [
            (r.name, "x".join(map(str, r.shape)) or "scalar", _spec_text(r.spec), r.source, _size(r.bytes_per_device))
            for r in self.rows
        ]
        widths = [max(len(str(x)) for x in column) for column in zip(header, *lines)]
        def row(cells) -> str:
            return "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()
        plan = self.plan
        return "\n".join([
            f"strategy {plan.strategy}, mesh {plan.mesh} ({plan.reason})",
            row(header),
            *(row(cells) for cells in lines),
            f"total {_size(self.total_bytes)}; per device {_size(self.bytes_per_device)} "
            f"({self.bytes_per_device / max(self.total_bytes, 1):.1%} of the total)",
        ])

    __repr__ = __str__


def describe_sharding(model) -> ShardingTable:
    """Where each parameter of a :class:`~ttpu.TPUModel` lives: shape, spec, the rule it
    came from and the bytes each device holds."""
    plan: ShardingPlan = model.sharding
    rows, total = [], 0
    for name, parameter in model.torch_module.named_parameters():
        size = parameter.numel() * parameter.element_size()
        found = plan.parameters.get(name)
        spec = found.spec if found else (None,) * parameter.ndim
        split = math.prod(plan.mesh.split(axis) for axis in spec)
        rows.append(ShardRow(name, tuple(parameter.shape), spec, found.source if found else "replicated", size // split))
        total += size
    return ShardingTable(plan, tuple(rows), total)


def _spec_text(spec: Spec) -> str:
    return "(" + ", ".join("-" if a is None else "+".join(a) if isinstance(a, tuple) else a for a in spec) + ")"


def _size(n: float) -> str:
    if n < 1024:
        return f"{n:.0f} B"
    for unit in ("KiB", "MiB", "GiB"):
        n /= 1024
        if n < 1024 or unit == "GiB":
            break
    return f"{n:.1f} {unit}"
