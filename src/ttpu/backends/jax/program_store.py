"""Traced programs kept across processes: ``jax.export``-ed into the ttpu cache.

Tracing a transformers model through torchax costs seconds per program (the forward
buckets, the prefill, the decode loop), every time a process starts, and jax's
persistent compilation cache only helps after the trace. A :class:`ProgramStore` keeps
each traced program as serialized StableHLO (``jax.export``) together with the pytree
structure of its results, under a key that digests everything that changes the
program: the model (config, class, attention and experts implementations, patches, the
weights' names, shapes, dtypes and shardings), the versions of ttpu (its source too),
transformers, torch, torchax, jax and jaxlib, the devices, and the program's own
signature (name, constants, input structure, shapes, dtypes and shardings). A second
process loads the program instead of tracing it; a key miss traces as before; an entry
that cannot be read is deleted and replaced.

Files are written atomically (a temporary file renamed into place) and read with an
unpickler that only rebuilds the pytree node types of transformers, ttpu, torch, jax
and numpy.

The store also remembers, per model, which programs ran most recently and with which
argument shapes (a small JSON index), so that a later process can compile them before
they are asked for (:mod:`ttpu.backends.jax.warm_up`).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.metadata
import io
import json
import logging
import os
import pickle
import sys
import tempfile
import types
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import jax
import torch

from ttpu.paths import program_cache_dir
from ttpu.patches.registry import APPLIED_PATCHES_ATTRIBUTE

logger = logging.getLogger(__name__)

# Bumped when the stored format changes.
FORMAT_VERSION = 1
RECENT_PROGRAMS = 8  # remembered per model, for the next process's warm-up
VERSIONED_PACKAGES = ("transformers", "torch", "torchax", "jax", "jaxlib", "flatbuffers")


class StoredProgram(NamedTuple):
    """One traced program: its serialized export (None for a shapes-only record), and
    the structure and shapes of its results."""

    exported: bytes | None
    out_tree: Any  # jax PyTreeDef of the results
    out_shapes: tuple[tuple[tuple[int, ...], str], ...]


class ArgumentSpec(NamedTuple):
    """One flat argument of a recorded program run: its shape, dtype and partition spec,
    and the weight it was (None for other arguments)."""

    shape: tuple[int, ...]
    dtype: str
    spec: tuple[Any, ...]
    weight: str | None


class RecentProgram(NamedTuple):
    """A program the model ran: its store key, arguments and donated argument positions."""

    key: str
    arguments: tuple[ArgumentSpec, ...]
    donated: tuple[int, ...]


class ProgramStore:
    """Programs of one model, under ``directory``; ``context`` names what the model's
    programs depend on beyond their own signature (see the module docstring).
    ``warm_up`` is the background compilation of the programs it ran last time, if any."""

    def __init__(self, directory: Path, context: Mapping[str, Any]) -> None:
        self.directory = directory
        self._context = digest({**environment_context(), **context})
        self.loaded = 0  # programs read back instead of traced
        self.saved = 0
        self.warm_up: Any = None  # a ttpu.backends.jax.warm_up.WarmUp once started

    def recent(self) -> list[RecentProgram]:
        """The programs this model ran most recently (oldest first); [] if none or unreadable."""
        try:
            entries = json.loads(self._recent_path().read_text())
            return [
                RecentProgram(e["key"], tuple(ArgumentSpec(tuple(a[0]), a[1], _spec(a[2]), a[3]) for a in e["arguments"]), tuple(e["donated"]))
                for e in entries
            ]
        except (OSError, ValueError, KeyError, TypeError, IndexError):
            return []

    def note_used(self, program: RecentProgram) -> None:
        """Record that ``program`` ran (it becomes the most recent)."""
        recent = [p for p in self.recent() if p.key != program.key][-(RECENT_PROGRAMS - 1):]
        entries = [{"key": p.key, "arguments": [list(a) for a in p.arguments], "donated": list(p.donated)} for p in [*recent, program]]
        _write_atomically(self._recent_path(), json.dumps(entries).encode(), "the recent-programs index")

    def _recent_path(self) -> Path:
        return self.directory / "recent" / f"{self._context}.json"

    def key(self, name: str, signature: Any) -> str:
        """The file key of program ``name`` with this ``signature`` (a value whose repr
        is deterministic: constants, tree structures, shapes, dtypes, shardings)."""
        return digest({"context": self._context, "program": name, "signature": signature})

    def load(self, key: str) -> StoredProgram | None:
        path = self._path(key)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            logger.warning("cannot read stored program %s (%s); tracing it again", path, exc)
            return None
        try:
            program = _RestrictedUnpickler(io.BytesIO(data)).load()
            if not isinstance(program, StoredProgram):
                raise TypeError(f"holds {type(program).__name__}, not a StoredProgram")
        except Exception as exc:
            logger.warning("stored program %s is unreadable (%s); replacing it", path, exc)
            path.unlink(missing_ok=True)
            return None
        self.loaded += 1
        return program

    def save(self, key: str, program: StoredProgram) -> None:
        """Write ``program`` atomically; a failure (disk full, read-only cache) is logged,
        never raised: the program runs anyway."""
        if _write_atomically(self._path(key), pickle.dumps(program, protocol=pickle.HIGHEST_PROTOCOL), "program"):
            self.saved += 1

    def _path(self, key: str) -> Path:
        return self.directory / key[:2] / f"{key}.program"


def _spec(entries: list[Any]) -> tuple[Any, ...]:
    """A partition spec read back from JSON (axis tuples come back as lists)."""
    return tuple(tuple(e) if isinstance(e, list) else e for e in entries)


def _write_atomically(path: Path, data: bytes, what: str) -> bool:
    """Write ``data`` through a temporary file renamed into place; a failure is logged
    and returns False."""
    temporary = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, prefix=".tmp-", delete=False) as file:
            temporary = file.name
            file.write(data)
        os.replace(temporary, path)
        return True
    except Exception as exc:
        logger.warning("could not write %s %s (%s)", what, path, exc)
        if temporary is not None:
            with contextlib.suppress(OSError):
                os.unlink(temporary)
        return False


def open_store(context: Mapping[str, Any]) -> ProgramStore | None:
    """The store for a model's programs, or None where programs are not kept: the
    store is switched off (``TTPU_PROGRAM_CACHE=off``), or a multi-process job (each
    process would trace its own part of a global program)."""
    directory = program_cache_dir()
    if directory is None or jax.process_count() > 1:
        return None
    return ProgramStore(directory, context)


def export_program(function: Callable[..., Any], example: list[Any], donate: tuple[int, ...], out_shardings: Any) -> StoredProgram:
    """Trace ``function`` (flat array arguments -> flat list of results, which records
    its result tree in ``function.out_tree``) at the shapes of ``example`` and export it."""
    jitted = jax.jit(function, donate_argnums=donate, **_out_shardings(out_shardings))
    specs = [jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)) for x in example]
    exported = jax.export.export(jitted)(*specs)
    shapes = tuple((tuple(a.shape), str(a.dtype)) for a in exported.out_avals)
    return StoredProgram(bytes(exported.serialize()), function.out_tree, shapes)


def compile_program(program: StoredProgram, example: list[Any], donate: tuple[int, ...], out_shardings: Any) -> Any:
    """The executable of a stored program for arguments shaped like ``example``."""
    exported = jax.export.deserialize(bytearray(program.exported))
    jitted = jax.jit(exported.call, donate_argnums=donate, **_out_shardings(out_shardings))
    return jitted.lower(*example).compile()


def _out_shardings(out_shardings: Any) -> dict[str, Any]:
    return {} if out_shardings is None else {"out_shardings": out_shardings}


def model_context(
    module: torch.nn.Module, weights: Mapping[str, jax.ShapeDtypeStruct | jax.Array], traced_buffers: frozenset[str]
) -> dict[str, Any]:
    """What a model's traced programs depend on besides their inputs and the library
    versions: its class, config, attention and experts implementations, weights
    (names, shapes, dtypes, shardings: placed arrays, or their description before they
    are placed), the buffers baked in as constants, and code that is not transformers'
    or ttpu's own."""
    config = module.config
    return {
        "module": f"{type(module).__module__}.{type(module).__qualname__}",
        "config": config.to_json_string(use_diff=False),
        "attention": config._attn_implementation,
        "experts": getattr(config, "_experts_implementation", None),
        "weights": [(name, tuple(a.shape), str(a.dtype), repr(a.sharding)) for name, a in sorted(weights.items())],
        "constants": _constant_buffers_digest(module, traced_buffers),
        "code": _model_code_digest(module),
    }


def _constant_buffers_digest(module: torch.nn.Module, traced: frozenset[str]) -> str:
    """The values of the buffers baked into programs as constants (they may come from
    the checkpoint, not only from the config)."""
    sha = hashlib.sha256()
    for name, buffer in module.named_buffers():
        if name not in traced and buffer.device.type != "meta":
            sha.update(name.encode())
            sha.update(buffer.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return sha.hexdigest()


def _model_code_digest(module: torch.nn.Module) -> str:
    """The code a trace runs beyond transformers' own (covered by its version) and ttpu's
    (covered by the store): modules of classes defined elsewhere (remote code, user
    subclasses), per-instance forwards (patches, user overrides) and forward hooks,
    and the patches applied."""
    sha = hashlib.sha256(repr(getattr(module, APPLIED_PATCHES_ATTRIBUTE, ())).encode())
    for name in sorted({type(m).__module__ for m in module.modules()}):
        path = getattr(sys.modules.get(name), "__file__", None)
        if not name.startswith("transformers.") and path and os.path.isfile(path):
            sha.update(Path(path).read_bytes())
    for path, submodule in module.named_modules():
        overrides = [vars(submodule).get("forward"), *submodule._forward_pre_hooks.values(), *submodule._forward_hooks.values()]
        for function in filter(None, overrides):
            sha.update(path.encode())
            sha.update(_function_digest(function).encode())
    return sha.hexdigest()


def _function_digest(function: Any, depth: int = 3) -> str:
    """A function's identity by content: its code, defaults and closure (functions in the
    closure by their own content, a few levels deep; other values by type and repr)."""
    function = getattr(function, "__func__", function)
    code = getattr(function, "__code__", None)
    if code is None or depth == 0:
        return f"{type(function).__qualname__}:{getattr(function, '__qualname__', '')}"
    cells = [cell.cell_contents for cell in (function.__closure__ or ()) if _cell_filled(cell)]
    parts = [_code_digest(code)]
    for value in [*(function.__defaults__ or ()), *cells]:
        is_function = callable(value) and hasattr(getattr(value, "__func__", value), "__code__")
        parts.append(_function_digest(value, depth - 1) if is_function else f"{type(value).__qualname__}")
    return hashlib.sha256("|".join(parts).encode()).hexdigest()


def _code_digest(code: types.CodeType) -> str:
    """Bytecode, names and constants (nested code objects by their own content, not by
    their repr, which holds a memory address)."""
    consts = [_code_digest(c) if isinstance(c, types.CodeType) else repr(c) for c in code.co_consts]
    return "|".join([code.co_name, code.co_code.hex(), repr(code.co_names), *consts])


def _cell_filled(cell: Any) -> bool:
    try:
        cell.cell_contents
    except ValueError:
        return False
    return True


def digest(value: Any) -> str:
    return hashlib.sha256(repr(value).encode()).hexdigest()


@functools.cache
def environment_context() -> dict[str, Any]:
    """What every program depends on outside the model: library versions (ttpu's
    source included, so an edited checkout never reuses stale programs), the devices
    and jax's numeric flags."""
    versions = {}
    for package in VERSIONED_PACKAGES:
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    return {
        "format": FORMAT_VERSION,
        "ttpu": _ttpu_source_digest(),
        "versions": versions,
        "devices": [(d.platform, d.device_kind) for d in jax.devices()],
        "x64": jax.config.jax_enable_x64,
    }


def _ttpu_source_digest() -> str:
    import ttpu

    root = Path(ttpu.__file__).parent
    sha = hashlib.sha256(ttpu.__version__.encode())
    for path in sorted(root.rglob("*.py")):
        sha.update(str(path.relative_to(root)).encode())
        sha.update(path.read_bytes())
    return sha.hexdigest()


class _RestrictedUnpickler(pickle.Unpickler):
    """Rebuilds only what stored programs hold: classes (pytree node types and the
    static metadata of their nodes) from these packages, torch dtypes, and jax's pytree
    registry; never a function that unpickling could call."""

    ALLOWED_ROOTS = ("builtins", "collections", "ttpu", "transformers", "torch", "jax", "jaxlib", "numpy")

    def find_class(self, module: str, name: str) -> Any:
        if module.split(".")[0] in self.ALLOWED_ROOTS:
            found = super().find_class(module, name)
            if isinstance(found, type) or _is_torch_dtype(found) or found is jax.tree_util.default_registry:
                return found
        raise pickle.UnpicklingError(f"a stored program may not reference {module}.{name}")


def _is_torch_dtype(value: Any) -> bool:
    return isinstance(value, torch.dtype)
