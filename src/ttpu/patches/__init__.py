"""Per-architecture and generic patches; importing this package registers them."""

from ttpu.patches import moe  # noqa: F401  (registers its patches)
from ttpu.patches.registry import (
    PATCHES,
    Patch,
    apply_patches,
    forward_patch,
    instances_of,
    register,
)

__all__ = ["PATCHES", "Patch", "apply_patches", "forward_patch", "instances_of", "register"]
