"""The sharding rules engine: one partition spec per parameter, for every backend.

A spec has one entry per dimension: the mesh axis that dimension is split over, or None
(replicated along it). For each parameter, in order of precedence:

1. the user's regex rules (``[(r"lm_head", ("tensor", None))]``, first match wins);
2. the model's own tensor-parallel plan (transformers' ``base_model_tp_plan`` and the
   head's ``_tp_plan``: "colwise", "rowwise", "embedding_rowwise", ...);
3. inference from the module structure: attention q/k/v and MLP up/gate projections are
   column-parallel, attention output and MLP down projections row-parallel, token
   embeddings and the LM head split over the vocabulary, MoE experts like their plan;
4. replicated.

Steps 2-3 only place the ``tensor`` axis. With an ``fsdp`` axis each parameter is
then also split along its largest remaining dimension. Every split is checked for
divisibility; a dimension that does not divide is replicated instead, with one warning
naming the parameter.
"""

from __future__ import annotations

import re
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Union

import torch

from ttpu.errors import InvalidArgumentError
from ttpu.sharding.mesh import AXES, DATA_AXES, MeshShape

logger = logging.getLogger(__name__)

Axis = Union[str, tuple[str, ...], None]
Spec = tuple[Axis, ...]
Rule = tuple[str, Sequence[Axis]]

# transformers' tensor-parallel styles, by the dimension they split
COLUMN_STYLES = {"colwise", "colwise_gather_output", "colwise_rep", "packed_colwise"}
ROW_STYLES = {"rowwise", "rowwise_split_input", "rowwise_rep", "packed_rowwise"}
EMBEDDING_STYLES = {"embedding_rowwise": 0, "embedding_colwise": 1}

# module names (last path component) whose linear layers are column- or row-parallel
COLUMN_NAMES = {
    "q_proj", "k_proj", "v_proj", "qkv_proj", "query", "key", "value", "query_key_value",
    "c_attn", "Wqkv", "qkv", "in_proj", "gate_proj", "up_proj", "gate_up_proj", "fc1",
    "fc_in", "c_fc", "dense_h_to_4h", "w1", "w3", "wi", "lm_head",
}
ROW_NAMES = {
    "o_proj", "out_proj", "c_proj", "down_proj", "fc2", "fc_out", "dense_4h_to_h", "w2", "wo",
}


@dataclass(frozen=True)
class ParameterSharding:
    """Where one parameter's spec came from ("rule r'...'", "plan colwise", "inferred
    rowwise", "fsdp", "replicated") and the spec itself."""

    name: str
    shape: tuple[int, ...]
    spec: Spec
    source: str


def parameter_shardings(
    module: torch.nn.Module, mesh: MeshShape, rules: Iterable[Rule] = ()
) -> dict[str, ParameterSharding]:
    """A spec for every parameter of ``module`` (tied parameters under their first name)."""
    rules = _checked_rules(rules, mesh)
    plan = _compiled_plan(getattr(module, "_tp_plan", None) or {})
    modules = dict(module.named_modules())
    result = {}
    for name, parameter in module.named_parameters():
        shape = tuple(parameter.shape)
        owner_name = name.rpartition(".")[0]
        spec, source = _user_spec(name, rules)
        if spec is None:
            spec, source = _tensor_spec(name, owner_name, modules.get(owner_name), shape, plan, mesh)
            if mesh.size("fsdp") > 1:
                spec, source = _add_fsdp(spec, source, shape, mesh)
        result[name] = ParameterSharding(name, shape, _divisible(name, shape, spec, mesh), source)
    return result


def batch_spec(shape: Sequence[int], mesh: MeshShape) -> Spec:
    """Dimension 0 over the data axes (as many as divide it), the rest replicated."""
    return (batch_axes(shape[0], mesh), *([None] * (len(shape) - 1)))


def batch_axes(batch: int, mesh: MeshShape) -> Axis:
    """The longest run of data axes (data, fsdp) whose product divides ``batch``."""
    chosen: list[str] = []
    product = 1
    for axis in DATA_AXES:
        size = mesh.size(axis)
        if size > 1 and batch % (product * size) == 0:
            chosen.append(axis)
            product *= size
    return tuple(chosen) if len(chosen) > 1 else (chosen[0] if chosen else None)


def kv_cache_spec(shape: Sequence[int], mesh: MeshShape) -> Spec:
    """A [batch, heads, length, head_dim] cache: batch over data axes, heads over tensor."""
    heads = "tensor" if mesh.size("tensor") > 1 and shape[1] % mesh.size("tensor") == 0 else None
    return (batch_axes(shape[0], mesh), heads, None, None)


def _checked_rules(rules: Iterable[Rule], mesh: MeshShape) -> list[tuple[re.Pattern, Spec, str]]:
    checked = []
    for rule in rules or ():
        if not (isinstance(rule, (tuple, list)) and len(rule) == 2 and isinstance(rule[0], str)):
            raise InvalidArgumentError(
                f"a sharding rule is (regex, spec), e.g. (r'lm_head', ('tensor', None)); got {rule!r}."
            )
        pattern, spec = rule
        spec = tuple(spec) if isinstance(spec, (tuple, list)) else (spec,)
        for entry in spec:
            for axis in entry if isinstance(entry, tuple) else (entry,):
                if axis is not None and axis not in mesh.names:
                    raise InvalidArgumentError(
                        f"sharding rule {pattern!r} names axis {axis!r}, which the mesh {mesh} does not "
                        f"have; valid: {', '.join(mesh.names)} or None (ttpu's axes: {', '.join(AXES)})."
                    )
        try:
            checked.append((re.compile(pattern), spec, pattern))
        except re.error as exc:
            raise InvalidArgumentError(f"sharding rule {pattern!r} is not a valid regex: {exc}") from exc
    return checked


def _user_spec(name: str, rules: list[tuple[re.Pattern, Spec, str]]) -> tuple[Spec | None, str]:
    for regex, spec, pattern in rules:
        if regex.search(name):
            return spec, f"rule {pattern!r}"
    return None, ""


def _compiled_plan(plan: dict[str, str]) -> list[tuple[re.Pattern, str]]:
    """transformers' plan keys ("model.layers.*.mlp.up_proj") as anchored regexes."""
    return [
        (re.compile(re.escape(key).replace(r"\*", r"\d+") + "$"), style)
        for key, style in plan.items()
    ]


def _tensor_spec(
    name: str, owner_name: str, owner: torch.nn.Module | None, shape: tuple[int, ...],
    plan: list[tuple[re.Pattern, str]], mesh: MeshShape,
) -> tuple[Spec, str]:
    replicated: Spec = (None,) * len(shape)
    if mesh.size("tensor") == 1:
        return replicated, "replicated"
    style = next((s for regex, s in plan if regex.match(name) or regex.match(owner_name)), None)
    source = f"plan {style}"
    if style is None:
        style = _inferred_style(name, owner_name, owner)
        source = f"inferred {style}"
    dim = _split_dimension(style, owner, shape)
    if dim is None:
        return replicated, "replicated"
    return tuple("tensor" if i == dim else None for i in range(len(shape))), source


def _inferred_style(name: str, owner_name: str, owner: torch.nn.Module | None) -> str | None:
    if isinstance(owner, torch.nn.Embedding) or hasattr(owner, "num_embeddings"):  # quantized tables too
        return "embedding_rowwise"  # rows: the vocabulary (or positions)
    parts = owner_name.split(".")
    last = parts[-1] if parts else ""
    parameter = name.rpartition(".")[2]
    if parameter in ("gate_up_proj", "w1", "w3") or last in COLUMN_NAMES:
        return "colwise"
    if parameter in ("down_proj", "w2") or last in ROW_NAMES:
        return "rowwise"
    if last == "dense":  # BERT-style naming: intermediate.dense widens, the others narrow
        return "colwise" if len(parts) > 1 and parts[-2] == "intermediate" else "rowwise"
    return None


def _split_dimension(style: str | None, owner: torch.nn.Module | None, shape: tuple[int, ...]) -> int | None:
    """Which dimension a style splits. Weights are [..., out, in] (torch Linear, MoE
    experts) except GPT-2's Conv1D, [in, out]; biases are split only column-wise."""
    if style in EMBEDDING_STYLES:  # a table, or a quantized table's per-row scales
        dim = EMBEDDING_STYLES[style]
        return dim if dim < len(shape) <= 2 else None
    column, row = style in COLUMN_STYLES, style in ROW_STYLES
    if not (column or row):
        return None
    if len(shape) == 1:
        return 0 if column else None
    transposed = type(owner).__name__ == "Conv1D"
    output, input_ = (len(shape) - 1, len(shape) - 2) if transposed else (len(shape) - 2, len(shape) - 1)
    return output if column else input_


def _add_fsdp(spec: Spec, source: str, shape: tuple[int, ...], mesh: MeshShape) -> tuple[Spec, str]:
    """Also split the largest dimension that is free and divides by the fsdp size."""
    split = split_largest_free(spec, shape, "fsdp", mesh.size("fsdp"))
    if split == spec:
        return spec, source
    return split, "fsdp" if source == "replicated" else f"{source} + fsdp"


def split_largest_free(spec: Spec, shape: Sequence[int], entry: Axis, ways: int, exclude: Sequence[int] = ()) -> Spec:
    """``spec`` with its largest unsplit dimension that divides by ``ways`` (and is not
    in ``exclude``) split over ``entry`` (an axis or tuple of axes); unchanged when no
    dimension qualifies."""
    free = [i for i in range(len(shape)) if spec[i] is None and shape[i] % ways == 0 and i not in exclude]
    if not free:
        return spec
    dim = max(free, key=lambda i: (shape[i], -i))
    return tuple(entry if i == dim else axis for i, axis in enumerate(spec))


def _divisible(name: str, shape: tuple[int, ...], spec: Spec, mesh: MeshShape) -> Spec:
    """Replicate every dimension whose split does not divide; warn once per parameter."""
    if len(spec) > len(shape):
        raise InvalidArgumentError(
            f"the spec {spec} for {name} has {len(spec)} entries but the parameter has "
            f"{len(shape)} dimensions {shape}."
        )
    spec = (*spec, *([None] * (len(shape) - len(spec))))
    kept, dropped = [], []
    for size, axis in zip(shape, spec):
        split = mesh.split(axis)
        if size % split:
            dropped.append(f"dimension of size {size} over {axis!r} ({split} devices)")
            kept.append(None)
        else:
            kept.append(axis)
    if dropped:
        logger.warning(
            "sharding: %s %s is replicated along %s: the size does not divide by the number of devices.",
            name, shape, "; ".join(dropped),
        )
    return tuple(kept)
