"""Declarative registry of adaptations applied to models before they are traced.

Each patch states why it exists, which test fails without it, which transformers
versions it applies to, and a predicate choosing the models it touches. Patches act on
the loaded torch module (or on the backend's op table) and never at import time.
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import transformers
from packaging.specifiers import SpecifierSet
from packaging.version import Version


@dataclass(frozen=True)
class Patch:
    name: str
    reason: str
    test: str  # the test that fails without this patch
    applies_to: Callable[[torch.nn.Module], bool]
    apply: Callable[[torch.nn.Module], None]
    transformers_versions: str = ""  # PEP 440 specifier; empty = all versions
    # What the patch changes outside the module (a modeling module's globals ...) is
    # changed only while a backend traces the module: entered around every trace.
    while_tracing: Callable[[torch.nn.Module], contextlib.AbstractContextManager] | None = None

    def is_applicable(self, module: torch.nn.Module) -> bool:
        version = Version(transformers.__version__)
        in_range = version in SpecifierSet(self.transformers_versions, prereleases=True)
        return in_range and self.applies_to(module)


PATCHES: list[Patch] = []


def instances_of(module: torch.nn.Module, qualified_class: str) -> list[torch.nn.Module]:
    """Submodules whose class is ``module.path.ClassName`` (without importing that module)."""
    return [
        m for m in module.modules()
        if f"{type(m).__module__}.{type(m).__qualname__}" == qualified_class
    ]


def forward_patch(
    name: str,
    qualified_class: str,
    forward: Callable[..., Any],
    *,
    reason: str,
    test: str,
    transformers_versions: str,
    attributes: Callable[[torch.nn.Module, torch.nn.Module], dict[str, Any]] | None = None,
) -> Patch:
    """A patch that gives every instance of ``qualified_class`` a replacement forward (and
    the ``attributes(model, instance)`` that forward needs)."""

    def apply(module: torch.nn.Module) -> None:
        for instance in instances_of(module, qualified_class):
            instance.forward = types.MethodType(forward, instance)
            for attribute, value in (attributes(module, instance) if attributes else {}).items():
                setattr(instance, attribute, value)

    return Patch(
        name=name,
        reason=reason,
        test=test,
        applies_to=lambda module: bool(instances_of(module, qualified_class)),
        apply=apply,
        transformers_versions=transformers_versions,
    )


def register(patch: Patch) -> Patch:
    if any(p.name == patch.name for p in PATCHES):
        raise ValueError(f"a patch named {patch.name!r} is already registered")
    PATCHES.append(patch)
    return patch


# The names of the patches applied to a module, recorded on it (keys of stored programs).
APPLIED_PATCHES_ATTRIBUTE = "_ttpu_applied_patches"


def apply_patches(module: torch.nn.Module) -> list[Patch]:
    """Apply every applicable patch to ``module``; returns those applied, in order."""
    applied = [p for p in PATCHES if p.is_applicable(module)]
    for patch in applied:
        patch.apply(module)
    setattr(module, APPLIED_PATCHES_ATTRIBUTE, tuple(p.name for p in applied))
    return applied


@contextlib.contextmanager
def tracing_scope(module: torch.nn.Module) -> Iterator[None]:
    """Enter the tracing-time changes of the patches applied to ``module``; backends
    wrap each trace of it in this."""
    applied = set(getattr(module, APPLIED_PATCHES_ATTRIBUTE, ()))
    with contextlib.ExitStack() as stack:
        for patch in PATCHES:
            if patch.name in applied and patch.while_tracing is not None:
                stack.enter_context(patch.while_tracing(module))
        yield
