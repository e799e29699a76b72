"""Failure causes: one short label per failed model type, for the report."""

from __future__ import annotations

import math
import re
from typing import Any


# (label, pattern on "Type: message"): the first match names the cause.
_CAUSES: list[tuple[str, re.Pattern]] = [
    ("op without lowering: {0}", re.compile(r"Operator with name ([\w:.]+) has no lowering")),
    ("op without lowering: {0}", re.compile(
        r"(aten::[\w.]+|aten\.[\w.]+)[^\n]*(?:not (?:implemented|supported|lowered)|no lowering)")),
    ("data-dependent shape/value under jit (.item/.tolist/nonzero/boolean indexing)", re.compile(
        r"ConcretizationTypeError|TracerBoolConversionError|TracerIntegerConversionError|"
        r"TracerArrayConversionError|NonConcreteBooleanIndexError|Abstract tracer value|"
        r"data-dependent|DynamicShape")),
    ("jax array used as an index (tensor index not converted)", re.compile(
        r"IndexError: only integers, slices .* are valid indices")),
    ("mixed torch CPU tensor with jax tensor", re.compile(
        r"Expected all tensors to be on the same device|found at least two devices|"
        r"expected .*(jax|torchax).*(cpu|CPU)|(cpu|CPU).*(jax|torchax)|is not a torchax|"
        r"unsupported operand type\(s\).*'(Tensor|View)'|"
        r"AssertionError: <class 'torch\.(nn\.parameter\.Parameter|Tensor)'>|"
        r"'Tensor' object has no attribute '_(env|elem)'")),
    ("ttpu input validation rejects the input ({0})", re.compile(
        r"InvalidArgumentError: input '(\w+)' must be")),
    ("torchax View object lacks a Tensor attribute", re.compile(r"'View' object has no attribute")),
    ("module property assigned during functional_call", re.compile(r"property '\w+' of '\w+' object has no setter")),
]
# frames inside torchax: failures raised by a lowering itself
_TORCHAX_FRAME = re.compile(r"^torchax/")


def classify(result: dict[str, Any]) -> str:
    """A short failure cause for a result ("" when it matches)."""
    if result.get("not_attempted"):
        return f"not attempted: {result['not_attempted']}"
    if result.get("matches"):
        return ""
    error = result.get("error") or {}
    text = f"{error.get('type', '')}: {error.get('message', '')}"
    stage = result.get("stage")
    missing_lib = re.search(r"requires the (\w+) library", error.get("message", ""))
    if missing_lib:
        return f"not attempted: needs {missing_lib.group(1)} (not installed)"
    if stage in ("config", "build", "eager", "class", "inputs"):
        return f"eager failed ({stage})"
    if stage == "timeout":
        return "timeout"
    if stage in ("crash", "harness"):
        return "worker crashed"
    if stage == "compare" and not error:
        err = result.get("rel_err")
        if err is None or not math.isfinite(err):
            return "non-finite output (NaN/inf where torch is finite)"
        return "numerical mismatch"
    if stage == "compare":
        return f"output structure differs: {error.get('type', '')}"
    return _error_cause(error)


# generate-only causes, tried before the forward's
_GENERATE_CAUSES: list[tuple[str, re.Pattern]] = [
    ("forward returns no Cache", re.compile(r"needs a model that returns a transformers Cache")),
    ("generation setting not implemented: {0}", re.compile(r"does not implement ([\w_]+)")),
    ("cache layer of its own: {0}", re.compile(r"does not know cache layer \d+'s kind \((\w+)\)")),
    ("model's own cache class", re.compile(r"uses cache of its own")),
    ("forward does not compile", re.compile(r"forward does not compile under ttpu")),
]


# why the serving engine recomputes a model's sequences instead of paging its cache
_RECOMPUTE_CAUSES: list[tuple[str, re.Pattern]] = [
    ("no cache to page (generate recomputes too)", re.compile(r"paged cache holds .* has none:")),
    ("layer kinds it does not keep", re.compile(r"paged cache holds")),
    ("attention outside AttentionInterface",
     re.compile(r"does not run with the paged attention|never calls transformers' attention")),
    ("the model reads its cache's length", re.compile(r"reads its cache's length")),
    ("a layer attending over another's keys",
     re.compile(r"calls attention but caches no keys|caches keys but attends with another layer")),
    ("attention over keys that are not the step's tokens'", re.compile(r"attends over keys other than its tokens")),
    ("a window only in the mask", re.compile(r"whose window reaches attention only through a mask")),
    ("the model numbers positions itself", re.compile(r"takes no position_ids")),
    ("attention temperature from the cache's length", re.compile(r"temperature tuning counts positions")),
    ("fails one request per row", re.compile(r"fails one request per row")),
    ("recurrent states beside indexer keys", re.compile(r"has recurrent states and indexer keys")),
]


def classify_recompute(reason: str) -> str:
    """A short cause of the serving engine's recomputing a model (its ``recompute_reason``)."""
    return next((label for label, pattern in _RECOMPUTE_CAUSES if pattern.search(reason)), reason[:80])


def classify_generate(check: dict[str, Any] | None) -> str:
    """A short failure cause of a generate or serve check ("" when it matches or was not run)."""
    if not check or check.get("matches"):
        return ""
    if not check.get("eager"):
        return "eager generate failed"
    if check.get("stage") == "compare":
        return "different tokens"
    error = check.get("error") or {}
    text = f"{error.get('type', '')}: {error.get('message', '')}"
    for label, pattern in _GENERATE_CAUSES:
        m = pattern.search(text)
        if m:
            return label.format(*(g for g in m.groups() if g))
    return _error_cause(error)


def _error_cause(error: dict[str, Any]) -> str:
    """The cause named by an error (type, message, innermost frames)."""
    text = f"{error.get('type', '')}: {error.get('message', '')}"
    for label, pattern in _CAUSES:
        m = pattern.search(text)
        if m:
            return label.format(*(g for g in m.groups() if g))
    where = error.get("where") or []
    if where and _TORCHAX_FRAME.search(where[-1]):
        func = where[-1].rsplit(" ", 1)[-1]
        return f"torchax lowering error in {func}: {error.get('type', '')}"
    return f"other: {error.get('type', '')}"


