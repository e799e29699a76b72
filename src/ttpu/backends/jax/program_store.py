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
"""

from __future__ import annotations

import concurrent.futures
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
import jax.numpy as jnp
import torch

from ttpu.paths import program_cache_dir
from ttpu.patches.registry import APPLIED_PATCHES_ATTRIBUTE

logger = logging.getLogger(__name__)

# Bumped when the stored format changes.
FORMAT_VERSION = 1
RECENT_PROGRAMS = 16  # remembered per model for the warm-up
VERSIONED_PACKAGES = ("transformers", "torch", "torchax", "jax", "jaxlib", "flatbuffers")


class StoredProgram(NamedTuple):
    """One traced program: its serialized export (None for a shapes-only record), and
    the structure and shapes of its results."""

    exported: bytes | None
    out_tree: Any  # jax PyTreeDef of the results
    out_shapes: tuple[tuple[tuple[int, ...], str], ...]


class ProgramStore:
    """Programs of one model, under ``directory``; ``context`` names what the model's
    programs depend on beyond their own signature (see the module docstring).

    The store also remembers which programs this model ran recently, with their argument
    shapes: :meth:`warm_up` compiles those in a background thread (and runs each once on
    dummy inputs, which XLA's first run of an executable needs) while the process goes on
    loading, and :meth:`take_warm` hands them over."""

    def __init__(self, directory: Path, context: Mapping[str, Any]) -> None:
        self.directory = directory
        self._context = digest({**environment_context(), **context})
        self.loaded = 0  # programs read back instead of traced
        self.saved = 0
        self.warmed = 0  # programs the warm-up had compiled when they were needed
        self._warm: dict[str, concurrent.futures.Future] = {}
        self._params: dict[int, int] = {}  # id of each weight array -> its index

    def warm_up(self, params: Mapping[str, jax.Array], mesh: jax.sharding.Mesh) -> None:
        """Start compiling this model's recently used programs in a background thread."""
        weights = jax.tree.leaves(dict(params))
        self._params = {id(w): i for i, w in enumerate(weights)}
        entries = [e for e in self._recent() if self._path(e["key"]).exists()]
        if not entries:
            return
        pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="ttpu-warm-up")
        for entry in entries:
            self._warm[entry["key"]] = pool.submit(self._compile_and_run, entry, weights, mesh)
        pool.shutdown(wait=False)

    def take_warm(self, key: str) -> tuple[StoredProgram, Any] | None:
        """The program and its executable if the warm-up compiled it (waiting for it if
        still under way); None otherwise."""
        future = self._warm.pop(key, None)
        if future is None:
            return None
        try:
            warm = future.result()
        except Exception as exc:
            logger.debug("warm-up of %s failed (%s); compiling it now", key, exc)
            return None
        self.warmed += 1
        return warm

    def note_used(self, key: str, leaves: list[Any], donated: tuple[int, ...]) -> None:
        """Remember that program ``key`` ran with arguments shaped like ``leaves``."""
        entry = {"key": key, "donated": list(donated), "leaves": [self._describe(x) for x in leaves]}
        recent = [e for e in self._recent() if e["key"] != key][-(RECENT_PROGRAMS - 1):]
        _write_atomically(self._recent_path(), json.dumps([*recent, entry]).encode())

    def _describe(self, leaf: Any) -> list[Any]:
        if id(leaf) in self._params:
            return ["weight", self._params[id(leaf)]]
        spec = list(leaf.sharding.spec) if isinstance(leaf.sharding, jax.sharding.NamedSharding) else []
        return ["array", list(leaf.shape), str(leaf.dtype), [s if s is None or isinstance(s, str) else list(s) for s in spec]]

    def _compile_and_run(self, entry: dict, weights: list[jax.Array], mesh: jax.sharding.Mesh) -> tuple[StoredProgram, Any]:
        stored = self.load(entry["key"])
        if stored is None or stored.exported is None:
            raise LookupError("not stored")
        leaves = [weights[d[1]] if d[0] == "weight" else _dummy(d, mesh) for d in entry["leaves"]]
        donated = tuple(entry["donated"])
        executable = compile_program(stored, leaves, donated, None)
        jax.block_until_ready(executable(*leaves))  # dummies only are donated
        return stored, executable

    def _recent(self) -> list[dict]:
        try:
            return json.loads(self._recent_path().read_text())
        except (OSError, ValueError):
            return []

    def _recent_path(self) -> Path:
        return self.directory / f"{self._context}.recent.json"

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
        if _write_atomically(self._path(key), pickle.dumps(program, protocol=pickle.HIGHEST_PROTOCOL)):
            self.saved += 1

    def _path(self, key: str) -> Path:
        return self.directory / key[:2] / f"{key}.program"


def _write_atomically(path: Path, data: bytes) -> bool:
    """Write ``data`` to ``path`` through a temporary file renamed into place; a failure
    is logged and returns False."""
    temporary = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, prefix=".tmp-", delete=False) as file:
            temporary = file.name
            file.write(data)
        os.replace(temporary, path)
        return True
    except Exception as exc:
        logger.warning("could not write %s (%s)", path, exc)
        if temporary is not None:
            with contextlib.suppress(OSError):
                os.unlink(temporary)
        return False


def _dummy(description: list[Any], mesh: jax.sharding.Mesh) -> jax.Array:
    """Zeros shaped, typed and laid out as a recorded argument (a PRNG key for key types)."""
    _, shape, dtype, spec = description
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*[tuple(s) if isinstance(s, list) else s for s in spec]))
    if dtype.startswith("key<"):
        return jax.device_put(jax.random.split(jax.random.key(0), shape) if shape else jax.random.key(0), sharding)
    return jnp.zeros(shape, dtype, device=sharding)


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


def model_context(module: torch.nn.Module, params: Mapping[str, jax.Array], traced_buffers: frozenset[str]) -> dict[str, Any]:
    """What a model's traced programs depend on besides their inputs and the library
    versions: its class, config, attention and experts implementations, weights
    (names, shapes, dtypes, shardings), the buffers baked in as constants, and code
    that is not transformers' or ttpu's own."""
    config = module.config
    return {
        "module": f"{type(module).__module__}.{type(module).__qualname__}",
        "config": config.to_json_string(use_diff=False),
        "attention": config._attn_implementation,
        "experts": getattr(config, "_experts_implementation", None),
        "weights": [(name, a.shape, str(a.dtype), repr(a.sharding)) for name, a in sorted(params.items())],
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
