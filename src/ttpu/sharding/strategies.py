"""Parallelism strategies: which mesh a name such as "fsdp" or "auto" stands for.

=========  ======================================  ====================================
strategy   mesh over n devices                      what is split
=========  ======================================  ====================================
dp         data n                                   the batch; weights replicated
fsdp       fsdp n                                   the batch and every weight
tp         tensor n                                 each layer's weights (Megatron-style)
2d         fsdp n/t x tensor t, t = largest          weights over both axes, the batch
           divisor of n that is <= sqrt(n)          over fsdp
3d         data n/(f t) x fsdp f x tensor t          as 2d, plus a replicated data axis
           (t, f: divisors near the cube root)
auto       see :func:`choose_auto`
=========  ======================================  ====================================
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ttpu.errors import InvalidArgumentError
from ttpu.sharding.mesh import MeshShape

STRATEGIES = ("dp", "fsdp", "tp", "2d", "3d", "auto")
# "auto" keeps this share of each device's memory for activations and the KV cache.
WEIGHT_MEMORY_SHARE = 0.5


@dataclass(frozen=True)
class Choice:
    """A strategy resolved to a mesh, with the reason (printed for "auto")."""

    strategy: str
    mesh: MeshShape
    reason: str


def mesh_for(strategy: str, device_count: int) -> MeshShape:
    """The mesh a named strategy uses on ``device_count`` devices."""
    n = device_count
    if strategy == "dp":
        return MeshShape((("data", n),))
    if strategy == "fsdp":
        return MeshShape((("fsdp", n),))
    if strategy == "tp":
        return MeshShape((("tensor", n),))
    if strategy == "2d":
        tensor = _divisor_near(n, 2)
        return MeshShape((("fsdp", n // tensor), ("tensor", tensor)))
    if strategy == "3d":
        tensor = _divisor_near(n, 3)
        fsdp = _divisor_near(n // tensor, 2)
        return MeshShape((("data", n // (tensor * fsdp)), ("fsdp", fsdp), ("tensor", tensor)))
    raise InvalidArgumentError(
        f"unknown parallelism {strategy!r}; valid: {', '.join(STRATEGIES)} (or None for one device)."
    )


def choose(strategy: str, device_count: int, weight_bytes: int, device_memory: int | None) -> Choice:
    """Resolve ``strategy`` (a name from :data:`STRATEGIES`) to a mesh."""
    if strategy == "auto":
        return choose_auto(device_count, weight_bytes, device_memory)
    return Choice(strategy, mesh_for(strategy, device_count), f"parallelism={strategy!r} requested")


def choose_auto(device_count: int, weight_bytes: int, device_memory: int | None) -> Choice:
    """The documented heuristic: replicate the weights (dp, no weight communication) when
    they take at most half of one device's memory; otherwise shard them over every device
    (fsdp) when a 1/n share fits in that half; otherwise fsdp x tensor (2d), whose tensor
    axis also splits activations. Unknown device memory counts as "fits"."""
    n = device_count
    budget = None if device_memory is None else WEIGHT_MEMORY_SHARE * device_memory
    size = f"{weight_bytes / 2**30:.2f} GiB of weights"
    where = "unknown device memory" if device_memory is None else f"{device_memory / 2**30:.1f} GiB per device"
    if n == 1:
        return Choice("dp", mesh_for("dp", 1), "one device")
    if budget is None or weight_bytes <= budget:
        return Choice("dp", mesh_for("dp", n), f"{size} fit replicated in half of {where}")
    if weight_bytes / n <= budget:
        return Choice(
            "fsdp", mesh_for("fsdp", n),
            f"{size} do not fit replicated in half of {where}; 1/{n} of them does (fsdp)",
        )
    return Choice(
        "2d", mesh_for("2d", n),
        f"{size} do not fit even as 1/{n} in half of {where}; fsdp x tensor also splits activations",
    )


def _divisor_near(n: int, root: int) -> int:
    """The largest divisor of ``n`` not above its ``root``-th root (at least 1)."""
    limit = n ** (1 / root) + 1e-9
    return max(d for d in range(1, math.isqrt(n) + 1) if n % d == 0 and d <= limit)
