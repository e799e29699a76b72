"""Register transformers' output and cache types as pytrees, generically.

``jax.jit`` can only pass pytrees of arrays across its boundary, and torchax converts
between torch and jax values with torch's pytree utilities. So every ``ModelOutput``
subclass, every ``Cache`` subclass and every cache layer class must be a pytree node in
both registries. transformers registers ``ModelOutput`` with torch already; everything
else is registered here by walking the class hierarchies, never class by class, so the
caches of transformers 5.x (built from layer objects such as ``StaticLayer``) and any
model-specific cache defined in a modeling file are covered.

Cache-like objects are flattened from their attributes: primitive values (ints, flags,
dtypes, devices, and containers holding only those) are static metadata, part of the tree
structure; everything else (tensors, nested caches and layers, lists of them) is a child.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable
from typing import Any

import jax
import torch
import torch.utils._pytree as torch_pytree
from transformers.cache_utils import Cache, CacheLayerMixin
from transformers.utils import ModelOutput

_JAX_REGISTERED: set[type] = set()
_TORCH_REGISTERED: set[type] = set()


def _all_subclasses(root: type) -> set[type]:
    found = {root}
    stack = [root]
    while stack:
        for sub in stack.pop().__subclasses__():
            if sub not in found:
                found.add(sub)
                stack.append(sub)
    return found


class StaticAttributes(Hashable):
    """The non-array attributes of a cache-like object: part of the tree structure."""

    def __init__(self, cls: type, items: dict[str, Any]) -> None:
        self.cls = cls
        self.items = items

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, StaticAttributes)
            and self.cls is other.cls
            and self.items.keys() == other.items.keys()
            and all(_static_equal(self.items[k], other.items[k]) for k in self.items)
        )

    def __hash__(self) -> int:
        return hash((self.cls, tuple(self.items)))

    def __repr__(self) -> str:
        return f"{self.cls.__name__}({self.items})"


def _static_equal(a: Any, b: Any) -> bool:
    try:
        return bool(a == b)
    except Exception:  # objects whose == is not a plain bool
        return a is b


_PRIMITIVES = (bool, int, float, complex, str, bytes, type(None), type, torch.dtype, torch.device)


def _is_static(value: Any) -> bool:
    """Metadata (ints, flags, dtypes, and containers of them) rather than tree content.

    Decided by what the value is *not*, so that a rebuilt object whose arrays were
    replaced by other leaves (tracers, ShapeDtypeStructs, None) flattens the same way.
    """
    if isinstance(value, _PRIMITIVES):
        return True
    if isinstance(value, (list, tuple, set, frozenset)):
        return all(_is_static(v) for v in value)
    if isinstance(value, dict):
        return all(_is_static(v) for v in value.values())
    return False


def _split_object(obj: Any) -> tuple[list[str], list[Any], StaticAttributes]:
    names, children, static = [], [], {}
    for name, value in vars(obj).items():
        if _is_static(value):
            static[name] = value
        else:
            names.append(name)
            children.append(value)
    return names, children, StaticAttributes(type(obj), static)


def _rebuild_object(
    cls: type, names: Iterable[str], children: Iterable[Any], static: StaticAttributes
) -> Any:
    obj = cls.__new__(cls)
    obj.__dict__.update(static.items)
    obj.__dict__.update(zip(names, children))
    return obj


def _rebuild_model_output(cls: type, keys: tuple[str, ...], values: Iterable[Any]) -> Any:
    # Bypass __post_init__, whose first-field heuristics would misread arbitrary leaves.
    out = cls.__new__(cls)
    dict.__init__(out)
    for key, value in zip(keys, values):
        out[key] = value
    return out


def _register_model_output(cls: type) -> None:
    if cls in _JAX_REGISTERED:
        return

    def flatten_with_keys(out: ModelOutput):
        keys = tuple(out.keys())
        return [(jax.tree_util.DictKey(k), out[k]) for k in keys], keys

    jax.tree_util.register_pytree_with_keys(
        cls,
        flatten_with_keys,
        lambda keys, values: _rebuild_model_output(cls, keys, values),
        flatten_func=lambda out: (tuple(out.values()), tuple(out.keys())),
    )
    _JAX_REGISTERED.add(cls)


def _register_cache_like(cls: type) -> None:
    if cls not in _JAX_REGISTERED:

        def flatten_with_keys(obj: Any):
            names, children, static = _split_object(obj)
            keyed = [(jax.tree_util.GetAttrKey(n), c) for n, c in zip(names, children)]
            return keyed, (tuple(names), static)

        def flatten(obj: Any):
            names, children, static = _split_object(obj)
            return children, (tuple(names), static)

        jax.tree_util.register_pytree_with_keys(
            cls,
            flatten_with_keys,
            lambda aux, children: _rebuild_object(cls, aux[0], children, aux[1]),
            flatten_func=flatten,
        )
        _JAX_REGISTERED.add(cls)
    if cls not in _TORCH_REGISTERED and cls not in torch_pytree.SUPPORTED_NODES:

        def torch_flatten(obj: Any):
            names, children, static = _split_object(obj)
            return children, (tuple(names), static)

        torch_pytree.register_pytree_node(
            cls,
            torch_flatten,
            lambda children, aux: _rebuild_object(cls, aux[0], children, aux[1]),
        )
        _TORCH_REGISTERED.add(cls)


def register_transformers_pytrees() -> None:
    """Register every currently defined output, cache and cache-layer class.

    Safe to call repeatedly; call it after a modeling module is imported so that its
    own output and cache classes are included.
    """
    for cls in _all_subclasses(ModelOutput):
        _register_model_output(cls)
    for cls in _all_subclasses(Cache) | _all_subclasses(CacheLayerMixin):
        _register_cache_like(cls)


def register_types_in(value: Any) -> None:
    """Register the output, cache and cache-layer types found in ``value`` (a model's
    output) that are not registered yet: classes defined by a modeling module imported
    after :func:`register_transformers_pytrees` ran. Only walks ``value``."""
    stack, seen = [value], set()
    while stack:
        item = stack.pop()
        if id(item) in seen:
            continue
        seen.add(id(item))
        if isinstance(item, ModelOutput):
            _register_model_output(type(item))
            stack.extend(item.values())
        elif isinstance(item, (Cache, CacheLayerMixin)):
            _register_cache_like(type(item))
            stack.extend(vars(item).values())
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
        elif isinstance(item, dict):
            stack.extend(item.values())
