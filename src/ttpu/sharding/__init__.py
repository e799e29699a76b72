"""Sharding, for every backend: meshes, strategies and the partition-spec rules engine."""

from ttpu.sharding.describe import ShardingTable, describe_sharding
from ttpu.sharding.mesh import AXES, MeshShape
from ttpu.sharding.plan import ShardingPlan, plan_sharding
from ttpu.sharding.strategies import STRATEGIES

__all__ = ["AXES", "STRATEGIES", "MeshShape", "ShardingPlan", "ShardingTable", "describe_sharding", "plan_sharding"]
