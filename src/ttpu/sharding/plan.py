"""A model's sharding plan: the mesh, why it was chosen, and every parameter's spec."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch

from ttpu.errors import InvalidArgumentError
from ttpu.sharding import rules as rules_engine
from ttpu.sharding.mesh import MeshShape
from ttpu.sharding.rules import ParameterSharding, Rule, Spec
from ttpu.sharding.strategies import choose

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ShardingPlan:
    """Where every weight, input and cache array goes. ``single_device``: no mesh over
    the devices, everything on the process' first device (the default)."""

    mesh: MeshShape
    strategy: str
    reason: str
    parameters: dict[str, ParameterSharding]
    single_device: bool = False

    def batch_spec(self, shape: Sequence[int]) -> Spec:
        """Spec of an input or activation with the batch first."""
        return rules_engine.batch_spec(shape, self.mesh)

    def input_specs(self, shapes: Sequence[Sequence[int]]) -> list[Spec]:
        """Specs of one call's array inputs, the main input first: those whose first axis
        is the batch (the first axis of the first input with two or more dimensions) are
        split along it, the others (positions, scalars) replicated."""
        batch = next((shape[0] for shape in shapes if len(shape) >= 2), None)
        return [
            self.batch_spec(shape) if len(shape) and shape[0] == batch else (None,) * len(shape)
            for shape in shapes
        ]

    def kv_cache_spec(self, shape: Sequence[int]) -> Spec:
        """Spec of one layer's [batch, heads, length, head_dim] keys or values."""
        return rules_engine.kv_cache_spec(shape, self.mesh)


def plan_sharding(
    module: torch.nn.Module,
    *,
    parallelism: str | None,
    mesh: Mapping[str, int] | None,
    rules: Iterable[Rule] | None,
    device_count: int,
    device_memory: int | None,
) -> ShardingPlan:
    """Resolve ``parallelism`` / ``mesh`` / ``rules`` (as given to ``from_pretrained``)."""
    rules = list(rules or ())
    if parallelism is not None and mesh is not None:
        raise InvalidArgumentError(
            "give either parallelism= (a strategy name) or mesh= (axis sizes), not both."
        )
    if parallelism is None and mesh is None:
        if rules:
            raise InvalidArgumentError(
                "sharding_rules need a mesh: pass parallelism= (e.g. 'fsdp') or mesh= as well."
            )
        shape = MeshShape((("data", 1),))
        return ShardingPlan(shape, "none", "one device (parallelism=None)", {}, single_device=True)
    if mesh is not None:
        shape = MeshShape.from_mapping(mesh, device_count)
        strategy, reason = "custom", f"mesh={dict(shape.axes)} requested"
    else:
        if not isinstance(parallelism, str):
            raise InvalidArgumentError(f"parallelism must be a strategy name (got {parallelism!r}).")
        choice = choose(parallelism, device_count, _weight_bytes(module), device_memory)
        shape, strategy, reason = choice.mesh, choice.strategy, choice.reason
        if parallelism == "auto":
            logger.info("parallelism='auto' chose %s %s: %s", strategy, shape, reason)
    parameters = rules_engine.parameter_shardings(module, shape, rules)
    return ShardingPlan(shape, strategy, reason, parameters)


def _weight_bytes(module: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())
