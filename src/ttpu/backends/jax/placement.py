"""Where arrays live on the JAX backend: a :class:`~ttpu.sharding.ShardingPlan` mapped
onto a ``jax.sharding.Mesh`` over all (global) devices.

Weights are placed shard by shard from host memory (each device receives only its own
slice, in every process only the slices of its local devices); inputs are split along
the batch; KV caches over heads and batch. With several processes, what a program
returns to the host is replicated first so every process can read it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from ttpu.sharding import ShardingPlan
from ttpu.sharding.rules import Spec


class Placement:
    """The jax mesh and shardings of one model's plan."""

    def __init__(self, plan: ShardingPlan) -> None:
        self.plan = plan
        if plan.single_device:
            devices = np.array(jax.local_devices()[:1])
        else:
            devices = mesh_utils.create_device_mesh(plan.mesh.sizes, jax.devices())
        self.mesh = Mesh(devices.reshape(plan.mesh.sizes), plan.mesh.names)
        self.replicated = NamedSharding(self.mesh, PartitionSpec())

    @property
    def multi_process(self) -> bool:
        return jax.process_count() > 1 and not self.plan.single_device

    def sharding(self, spec: Spec) -> NamedSharding:
        return NamedSharding(self.mesh, PartitionSpec(*spec))

    def weight(self, name: str, host: np.ndarray) -> jax.Array:
        """A weight from host memory, split as the plan says: each device receives only
        its slice, copied straight from ``host`` (never aliased, as CPU devices otherwise
        may). Returns once the copies are done (transfers are asynchronous), so the
        caller may release ``host`` right away."""
        sharding = self.weight_sharding(name)
        shards = [
            jax.device_put(host[index], device, may_alias=False)
            for device, index in sharding.addressable_devices_indices_map(host.shape).items()
        ]
        return jax.make_array_from_single_device_arrays(host.shape, sharding, shards).block_until_ready()

    def weight_sharding(self, name: str) -> NamedSharding:
        """Where weight ``name`` lives (replicated unless the plan splits it)."""
        found = self.plan.parameters.get(name)
        return self.sharding(found.spec if found else ())

    def batch(self, value: Any) -> jax.Array:
        """An input with the batch first (a scalar is replicated), split along the batch."""
        shape = np.shape(value)
        spec = self.plan.batch_spec(shape) if shape else ()
        return self.put(value, spec)

    def put(self, value: Any, spec: Spec) -> jax.Array:
        """``value`` (numpy or jax, the same on every process) laid out as ``spec``."""
        sharding = self.sharding(spec)
        if isinstance(value, jax.Array) and not self.multi_process:
            return jax.device_put(value, sharding)
        if isinstance(value, jax.Array) and jax.dtypes.issubdtype(value.dtype, jax.dtypes.prng_key):
            impl = jax.random.key_impl(value)
            return jax.random.wrap_key_data(self.put(jax.random.key_data(value), spec), impl=impl)
        host = np.asarray(value)
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    def kv_cache_shardings(self, shapes: Sequence[Sequence[int]]) -> list[NamedSharding]:
        return [self.sharding(self.plan.kv_cache_spec(shape)) for shape in shapes]

    def output_sharding(self) -> NamedSharding | None:
        """Shardings of program results: replicated with several processes (so each can
        read them), else left to the compiler."""
        return self.replicated if self.multi_process else None

    def to_host(self, value: jax.Array) -> np.ndarray:
        """Read an array on every process, whatever its sharding."""
        if not value.is_fully_addressable:
            value = jax.jit(lambda x: x, out_shardings=self.replicated)(value)
        return np.asarray(value)
