"""Deterministic iteration over sets of layer types, for stable compile-cache keys.

Many modeling files loop ``for layer_type in set(self.config.layer_types)`` (Gemma 2/3,
Mistral-style hybrids ...) to build one rotary table or mask per kind of layer. A set of
strings iterates in an order that changes with ``PYTHONHASHSEED``, i.e. from one process
to the next, so the traced program computes the same values in a different order, its
fingerprint changes, and jax's persistent compilation cache misses in about half of all
new processes. Here such sets iterate in a fixed (sorted) order: ``set`` in those
modeling modules is rebound only while ttpu traces the model (eager calls of any model
see the builtin), and the set attributes built in ``__init__`` are converted on the
patched module itself.
"""

from __future__ import annotations

import contextlib
import functools
import re
import sys
from collections.abc import Iterator
from typing import Any

import torch

from ttpu.patches.registry import Patch, register

SET_OF_LAYER_TYPES = re.compile(r"\bset\((self\.)?config\.(text_config\.)?layer_types\)")


class StableOrderSet(set):
    """A set that iterates in sorted order (by repr), the same in every process."""

    def __iter__(self) -> Iterator[Any]:
        return iter(sorted(super().__iter__(), key=repr))


def _modeling_modules(module: torch.nn.Module) -> list[Any]:
    """The transformers modeling modules whose code builds sets of layer types."""
    names = {type(m).__module__ for m in module.modules()}
    return [sys.modules[name] for name in sorted(names) if _builds_layer_type_sets(name)]


@functools.cache
def _builds_layer_type_sets(module_name: str) -> bool:
    """Does this transformers module's source build a set of layer types? (read once)"""
    path = getattr(sys.modules.get(module_name), "__file__", None)
    if not (module_name.startswith("transformers.models.") and path and path.endswith(".py")):
        return False
    with open(path, encoding="utf-8") as source:
        return bool(SET_OF_LAYER_TYPES.search(source.read()))


def _set_attributes(module: torch.nn.Module) -> list[tuple[torch.nn.Module, str]]:
    """Public set attributes (``self.unique_layer_types = set(...)`` in ``__init__``)."""
    return [
        (m, name) for m in module.modules() for name, value in vars(m).items()
        if type(value) is set and not name.startswith("_")
    ]


def _applies(module: torch.nn.Module) -> bool:
    return bool(_modeling_modules(module) or _set_attributes(module))


def _apply(module: torch.nn.Module) -> None:
    for owner, name in _set_attributes(module):  # sets built in __init__
        setattr(owner, name, StableOrderSet(getattr(owner, name)))


@contextlib.contextmanager
def _stable_sets_while_tracing(module: torch.nn.Module) -> Iterator[None]:
    """The modeling modules' own ``set(...)`` calls build StableOrderSets (builtins
    untouched), until the trace ends."""
    modeling = _modeling_modules(module)
    for namespace in modeling:
        namespace.set = StableOrderSet
    try:
        yield
    finally:
        for namespace in modeling:
            vars(namespace).pop("set", None)


register(
    Patch(
        name="stable_layer_type_order",
        reason=(
            "modeling code iterates set(config.layer_types), whose order changes with "
            "PYTHONHASHSEED: the traced program differed between processes and the "
            "persistent compile cache missed; such sets now iterate in sorted order"
        ),
        test="tests/test_patches.py::test_traced_program_is_the_same_in_every_process",
        applies_to=_applies,
        apply=_apply,
        while_tracing=_stable_sets_while_tracing,
        transformers_versions=">=5.0,<6",
    )
)
