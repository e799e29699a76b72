"""Per-architecture and generic patches; importing this package registers them."""

from ttpu.patches import attention, caches, moe, ordering, positions  # noqa: F401  (register their patches)
from ttpu.patches.registry import (
    PATCHES,
    Patch,
    apply_patches,
    forward_patch,
    instances_of,
    register,
    tracing_scope,
)

__all__ = ["PATCHES", "Patch", "apply_patches", "forward_patch", "instances_of", "register", "tracing_scope"]
