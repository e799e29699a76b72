"""Per-architecture and generic patches; importing this package registers them."""

from ttpu.patches.registry import PATCHES, Patch, apply_patches, register

__all__ = ["PATCHES", "Patch", "apply_patches", "register"]
