"""Ahead-of-time compiled executables of a jitted function, one per signature, counted.

``jax.jit`` compiles on demand and hides how often; ttpu compiles explicitly
(``lower().compile()``) so that every compile is counted (tests assert "no recompiles")
and a failure surfaces as a :class:`CompilationError` at a known point.

With a :class:`~ttpu.backends.jax.program_store.ProgramStore`, each signature's traced
program is exported there, and a later process compiles the stored program instead of
tracing the function again (``traces`` counts the traces this object really ran).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax

from ttpu.backends.jax.program_store import ProgramStore, StoredProgram, compile_program, export_program
from ttpu.errors import CompilationError

logger = logging.getLogger(__name__)


class Executables:
    """Compiled versions of ``function``; static arguments are hashable Python values,
    the others pytrees of arrays. ``len()`` is the number of compiles so far.

    ``name`` identifies the function in ``store`` (None: nothing is stored);
    ``background_warm_up`` says whether a later process compiles its programs in the
    background before they are asked for (off for programs an explicit warm-up compiles
    anyway, as the serving engine's steps)."""

    def __init__(
        self,
        function: Callable[..., Any],
        static_argnums: Sequence[int] = (),
        donate_argnums: Sequence[int] = (),
        out_shardings: Any = None,
        *,
        name: str = "",
        store: ProgramStore | None = None,
        background_warm_up: bool = True,
    ) -> None:
        self._function = function
        self._static = tuple(static_argnums)
        self._donate = tuple(donate_argnums)
        self._out_shardings = out_shardings
        self._name = name or getattr(function, "__qualname__", "program")
        self._store = store
        self._background_warm_up = background_warm_up
        self._compiled: dict[Any, _Program] = {}
        self._shapes: dict[Any, Any] = {}
        self.traces = 0

    def __len__(self) -> int:
        return len(self._compiled)

    def __call__(self, *args: Any) -> Any:
        return self.compiled(*args)(*self._dynamic(args))

    def compiled(self, *args: Any) -> _Program:
        """The executable for these arguments' signature, compiled on first use."""
        signature = self._signature(args)
        program = self._compiled.get(signature)
        if program is None:
            with compile_errors():
                program = self._build(args, signature)
            self._compiled[signature] = program
        return program

    def lower(self, *args: Any) -> Any:
        """The function traced and lowered for these arguments (never stored or
        counted): its program text, for inspection."""
        flat, _, donated = self._flattened(args)
        jitted = jax.jit(flat, donate_argnums=donated, **_sharded(self._out_shardings))
        return jitted.lower(*jax.tree.leaves(self._dynamic(args)))

    def output_shapes(self, *args: Any) -> Any:
        """The output's structure and shapes, without compiling."""
        signature = self._signature(args)
        shapes = self._shapes.get(signature)
        if shapes is None:
            with compile_errors():
                stored = self._stored(self._key(("shapes", signature)), lambda: self._trace_shapes(args))
            shapes = jax.tree.unflatten(
                stored.out_tree, [jax.ShapeDtypeStruct(shape, dtype) for shape, dtype in stored.out_shapes]
            )
            self._shapes[signature] = shapes
        return shapes

    def _dynamic(self, args: Sequence[Any]) -> list[Any]:
        return [a for i, a in enumerate(args) if i not in self._static]

    def _signature(self, args: Sequence[Any]) -> tuple:
        leaves, structure = jax.tree.flatten(self._dynamic(args))
        return (
            tuple(args[i] for i in self._static),
            structure,
            tuple((x.shape, x.dtype, getattr(x, "sharding", None)) for x in leaves),
        )

    def _build(self, args: Sequence[Any], signature: tuple) -> _Program:
        flat, in_tree, donated = self._flattened(args)
        leaves = jax.tree.leaves(self._dynamic(args))
        if self._store is not None:
            try:
                key = self._key(("program", signature))
                warm = self._store.warm_up.take(key) if self._store.warm_up else None
                if warm is None:
                    stored = self._stored(key, lambda: export_program(flat, leaves, donated, self._out_shardings))
                    executable = compile_program(stored, leaves, donated, self._out_shardings)
                else:
                    stored, executable = warm
                if self._store.warm_up and self._background_warm_up:
                    self._store.warm_up.record(key, leaves, donated)
                return _Program(executable, in_tree, stored.out_tree)
            except CompilationError:
                raise  # the model itself does not trace
            except Exception as exc:  # what jax.export refuses still runs, traced each time
                logger.info("%s is not stored (%s: %s); traced in every process", self._name, type(exc).__name__, exc)
        self.traces += 1
        jitted = jax.jit(flat, donate_argnums=donated, **_sharded(self._out_shardings))
        executable = jitted.lower(*leaves).compile()
        return _Program(executable, in_tree, flat.out_tree)

    def _key(self, kind: tuple[str, tuple]) -> str | None:
        """The store key of this kind of record ("program", "shapes") for a signature."""
        return self._store.key(self._name, repr(kind)) if self._store is not None else None

    def _stored(self, key: str | None, trace: Callable[[], StoredProgram]) -> StoredProgram:
        """The stored record under ``key``, traced (and stored) on a miss."""
        stored = self._store.load(key) if key is not None else None
        if stored is None:
            self.traces += 1
            stored = trace()
            if key is not None:
                self._store.save(key, stored)
        return stored

    def _trace_shapes(self, args: Sequence[Any]) -> StoredProgram:
        flat, _, _ = self._flattened(args)
        shapes = jax.eval_shape(flat, *jax.tree.leaves(self._dynamic(args)))
        return StoredProgram(None, flat.out_tree, tuple((tuple(s.shape), str(s.dtype)) for s in shapes))

    def _flattened(self, args: Sequence[Any]) -> tuple[_FlatFunction, Any, tuple[int, ...]]:
        """``function`` over the flat list of array leaves, the arguments' tree, and the
        positions of the donated leaves."""
        in_tree = jax.tree.structure(self._dynamic(args))
        static = {i: args[i] for i in self._static}
        donated, position = [], 0
        for i, arg in enumerate(args):
            if i in static:
                continue
            count = len(jax.tree.leaves(arg))
            if i in self._donate:
                donated.extend(range(position, position + count))
            position += count
        return _FlatFunction(self._function, in_tree, static, len(args)), in_tree, tuple(donated)


class _FlatFunction:
    """``function`` taking and returning flat lists of arrays (what ``jax.export``
    stores without knowing ttpu's or transformers' pytree types); the result structure
    of the last trace is kept in ``out_tree``."""

    def __init__(self, function: Callable[..., Any], in_tree: Any, static: dict[int, Any], arity: int) -> None:
        self._function = function
        self._in_tree = in_tree
        self._static = static
        self._arity = arity
        self.out_tree: Any = None

    def __call__(self, *leaves: Any) -> list[Any]:
        dynamic = iter(jax.tree.unflatten(self._in_tree, leaves))
        args = [self._static[i] if i in self._static else next(dynamic) for i in range(self._arity)]
        out_leaves, self.out_tree = jax.tree.flatten(self._function(*args))
        return out_leaves


class _Program:
    """A compiled executable over flat leaves, called with and returning pytrees."""

    def __init__(self, executable: Any, in_tree: Any, out_tree: Any) -> None:
        self.executable = executable
        self._in_tree = in_tree
        self._out_tree = out_tree

    def __call__(self, *dynamic: Any) -> Any:
        leaves, tree = jax.tree.flatten(list(dynamic))
        if tree != self._in_tree:
            raise CompilationError(f"arguments changed structure: {tree} vs the compiled {self._in_tree}")
        return jax.tree.unflatten(self._out_tree, self.executable(*leaves))

    def as_text(self) -> str:
        return self.executable.as_text()


def _sharded(out_shardings: Any) -> dict[str, Any]:
    return {} if out_shardings is None else {"out_shardings": out_shardings}


@contextlib.contextmanager
def compile_errors() -> Iterator[None]:
    """Report any failure while tracing or compiling as a CompilationError."""
    try:
        yield
    except CompilationError:
        raise
    except Exception as exc:
        raise CompilationError(
            f"XLA compilation failed: {type(exc).__name__}: {exc}\n"
            "  run `ttpu doctor MODEL` for the backend, attention and patches in use."
        ) from exc
