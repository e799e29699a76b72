"""Import torchax, working around torchax 0.0.13's import failure on torch >= 2.13.

torchax 0.0.13 (the newest release on PyPI) names named-tensor overloads such as
``torch.ops.aten.prod.dim_Dimname`` at import time (in its autocast table and its
decomposition list). torch 2.13 removed those overloads, so ``import torchax`` dies with
``AttributeError: ... has no overload name 'dim_Dimname'``. Upstream fixed it after 0.0.13.

The fix is gated on both conditions: it is applied only when the installed torchax is
<= 0.0.13 AND the installed torch lacks the named overloads. While torchax imports, a
missing named-tensor overload resolves to a unique inert placeholder, which is harmless in
the tables it lands in (no real op ever equals it). Nothing stays patched afterwards.
With a fixed torchax or an older torch the plain import runs untouched.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
from collections.abc import Iterator
from types import ModuleType

from packaging.version import Version

LAST_BROKEN_TORCHAX = Version("0.0.13")


class MissingOverload:
    """Stand-in for an op overload that the installed torch no longer has."""

    def __init__(self, qualified_name: str) -> None:
        self.qualified_name = qualified_name

    def __repr__(self) -> str:
        return f"<missing overload {self.qualified_name}>"


def _is_named_tensor_overload(name: str) -> bool:
    return "name" in name.lower()


def torch_lacks_named_overloads() -> bool:
    import torch

    return "dim_Dimname" not in torch.ops.aten.prod.overloads()


def needs_named_overload_fix() -> bool:
    """True when this torchax/torch pair fails at import without the fix."""
    try:
        torchax_version = Version(importlib.metadata.version("torchax"))
    except importlib.metadata.PackageNotFoundError:
        return False
    return torchax_version <= LAST_BROKEN_TORCHAX and torch_lacks_named_overloads()


@contextlib.contextmanager
def tolerate_missing_named_overloads() -> Iterator[None]:
    """Within the block, missing named-tensor overloads resolve to placeholders."""
    from torch._ops import OpOverloadPacket

    original = OpOverloadPacket.__getattr__

    def getattr_with_placeholders(self: OpOverloadPacket, key: str):
        try:
            return original(self, key)
        except AttributeError:
            if _is_named_tensor_overload(key):
                return MissingOverload(f"{self._qualified_op_name}.{key}")
            raise

    OpOverloadPacket.__getattr__ = getattr_with_placeholders
    try:
        yield
    finally:
        OpOverloadPacket.__getattr__ = original


def _import_and_build_env() -> ModuleType:
    import torchax

    # The decomposition table and op lowerings are imported lazily when the first
    # environment is built, so that must happen inside the fix too.
    torchax.default_env()
    return torchax


def import_torchax() -> ModuleType:
    """Import torchax and build its default environment, fixing torch 2.13 if needed."""
    if needs_named_overload_fix():
        with tolerate_missing_named_overloads():
            return _import_and_build_env()
    return _import_and_build_env()
