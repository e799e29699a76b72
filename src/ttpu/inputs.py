"""Forward inputs: bind, validate before compiling, split into arrays and constants.

Arrays (numpy, jax, torch tensors, caches) are traced; Python bools, ints, floats,
strings and None become compile-time constants.
"""

from __future__ import annotations

import inspect
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from transformers.cache_utils import Cache

from ttpu.errors import InvalidArgumentError


@dataclass(frozen=True)
class InputSpec:
    kind: str  # "integer", "float" or "any"
    ranks: tuple[int, ...]
    layout: str


KNOWN_INPUTS: dict[str, InputSpec] = {
    "input_ids": InputSpec("integer", (2,), "[batch, sequence]"),
    "attention_mask": InputSpec("any", (2, 4), "[batch, sequence]"),
    "token_type_ids": InputSpec("integer", (2,), "[batch, sequence]"),
    "position_ids": InputSpec("integer", (2, 3), "[batch, sequence]"),
    "decoder_input_ids": InputSpec("integer", (2,), "[batch, target_sequence]"),
    "decoder_attention_mask": InputSpec("any", (2,), "[batch, target_sequence]"),
    "labels": InputSpec("integer", (1, 2), "[batch] or [batch, sequence]"),
    "inputs_embeds": InputSpec("float", (3,), "[batch, sequence, hidden]"),
    "pixel_values": InputSpec("float", (4, 5), "[batch, channels, height, width]"),
    "input_features": InputSpec("float", (3,), "[batch, features, frames]"),
    "input_values": InputSpec("float", (2, 3), "[batch, samples] or [batch, channels, samples]"),
}

CONSTANT_TYPES = (bool, int, float, str, type(None))


def _is_array(value: Any) -> bool:
    return isinstance(value, (np.ndarray, torch.Tensor)) or type(value).__module__.startswith(
        ("jax", "jaxlib")
    )


def bind_arguments(forward: Callable, args: tuple, kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """Name positional arguments after ``forward``'s parameters and check the names."""
    signature = inspect.signature(forward)
    parameters = signature.parameters
    names = [
        n
        for n, p in parameters.items()
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]
    if len(args) > len(names):
        raise InvalidArgumentError(
            f"forward takes at most {len(names)} positional inputs ({', '.join(names)}); "
            f"got {len(args)}. Pass inputs by name, e.g. model(input_ids=ids)."
        )
    bound = dict(zip(names, args))
    for name, value in kwargs.items():
        if name in bound:
            raise InvalidArgumentError(f"input {name!r} was given both by position and by name.")
        bound[name] = value
    accepted = _accepted_names(parameters)
    unknown = [n for n in bound if accepted is not None and n not in accepted]
    if unknown:
        raise InvalidArgumentError(
            f"unknown input(s) {', '.join(map(repr, unknown))}; this model's forward accepts: "
            f"{', '.join(sorted(accepted))}."
        )
    return bound


def _accepted_names(parameters: Mapping[str, inspect.Parameter]) -> set[str] | None:
    """Names forward accepts; None when its ``**kwargs`` takes anything.

    transformers types ``**kwargs`` as ``Unpack[SomeTypedDict]``; its keys are accepted.
    """
    names = {n for n, p in parameters.items() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
    for p in parameters.values():
        if p.kind != p.VAR_KEYWORD:
            continue
        typed = typing.get_args(p.annotation)
        if typing.get_origin(p.annotation) is not typing.Unpack or not typed:
            return None
        names |= typed[0].__required_keys__ | typed[0].__optional_keys__
    return names


def split_inputs(
    bound: Mapping[str, Any], to_array: Callable[[Any], Any], float_dtype: np.dtype
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Validate inputs and split them into (arrays, constants).

    Constants come back hashable (lists as tuples): they key compiled executables.
    """
    arrays: dict[str, Any] = {}
    constants: dict[str, Any] = {}
    for name, value in bound.items():
        spec = KNOWN_INPUTS.get(name)
        if spec is not None and isinstance(value, (list, tuple)):
            value = np.asarray(value)
        if _is_array(value):
            arrays[name] = _checked_array(name, value, spec, to_array, float_dtype)
        elif isinstance(value, Cache):
            arrays[name] = to_array(value)
        elif isinstance(value, CONSTANT_TYPES) or _is_constant_tuple(value):
            if spec is not None and value is not None:
                raise InvalidArgumentError(
                    f"input {name!r} must be an array shaped {spec.layout}, "
                    f"got {type(value).__name__} {value!r}."
                )
            if value is not None:
                constants[name] = tuple(value) if isinstance(value, list) else value
        else:
            raise InvalidArgumentError(
                f"input {name!r} has type {type(value).__name__}: pass arrays (numpy, jax or "
                "torch), caches, or Python constants (bool, int, float, str, None)."
            )
    return arrays, constants


def _is_constant_tuple(value: Any) -> bool:
    return isinstance(value, (list, tuple)) and all(isinstance(v, CONSTANT_TYPES) for v in value)


def _checked_array(
    name: str, value: Any, spec: InputSpec | None, to_array: Callable, float_dtype: np.dtype
) -> Any:
    array = to_array(value)
    if spec is None:
        return array
    dtype = np.dtype(array.dtype)
    if array.ndim not in spec.ranks:
        hint = " Add a batch dimension, e.g. x[None]." if array.ndim + 1 in spec.ranks else ""
        raise InvalidArgumentError(
            f"input {name!r} must be shaped {spec.layout} (rank {' or '.join(map(str, spec.ranks))}),"
            f" got shape {tuple(array.shape)}.{hint}"
        )
    if spec.kind == "integer" and not np.issubdtype(dtype, np.integer):
        raise InvalidArgumentError(
            f"input {name!r} must hold integer token ids, got dtype {dtype}."
        )
    if spec.kind == "float":
        if not np.issubdtype(dtype, np.floating):
            raise InvalidArgumentError(f"input {name!r} must be floating point, got dtype {dtype}.")
        array = array.astype(float_dtype)
    return array


TOKEN_ID_INPUTS = ("input_ids", "decoder_input_ids")


def check_token_ids(ids: Any, vocab_size: int | None, name: str) -> None:
    """Refuse token ids outside ``[0, vocab_size)``: a compiled embedding lookup would
    clamp or zero them silently, where transformers raises."""
    if vocab_size is None:
        return
    ids = np.asarray(ids)
    if ids.size == 0 or not np.issubdtype(ids.dtype, np.integer):
        return
    low, high = int(ids.min()), int(ids.max())
    if low < 0 or high >= vocab_size:
        bad = low if low < 0 else high
        raise InvalidArgumentError(
            f"{name} holds token id {bad}, outside the model's vocabulary of {vocab_size} ids "
            f"(valid: 0..{vocab_size - 1}); tokenize with this model's tokenizer."
        )


def positional_embeddings(module: torch.nn.Module) -> list[torch.nn.Module]:
    """The modules of ``module`` that embed positions by index (Marian's, Pegasus',
    Whisper's positional-embedding modules): models whose forward takes no position ids
    number their tokens through them, from 0 or the cache's length."""
    return [m for m in module.modules() if "Position" in type(m).__name__ and "Embedding" in type(m).__name__]
