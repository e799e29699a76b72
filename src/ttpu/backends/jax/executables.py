"""Ahead-of-time compiled executables of a jitted function, one per signature, counted.

``jax.jit`` compiles on demand and hides how often; ttpu compiles explicitly
(``lower().compile()``) so that every compile is counted (tests assert "no recompiles")
and a failure surfaces as a :class:`CompilationError` at a known point.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax

from ttpu.errors import CompilationError


class Executables:
    """Compiled versions of ``function``; static arguments are hashable Python values,
    the others pytrees of arrays. ``len()`` is the number of compiles so far."""

    def __init__(
        self,
        function: Callable[..., Any],
        static_argnums: Sequence[int] = (),
        donate_argnums: Sequence[int] = (),
        out_shardings: Any = None,
    ) -> None:
        self._static = tuple(static_argnums)
        self._jitted = jax.jit(
            function,
            static_argnums=self._static,
            donate_argnums=tuple(donate_argnums),
            **({} if out_shardings is None else {"out_shardings": out_shardings}),
        )
        self._compiled: dict[Any, Any] = {}

    def __len__(self) -> int:
        return len(self._compiled)

    def __call__(self, *args: Any) -> Any:
        return self.compiled(*args)(*(a for i, a in enumerate(args) if i not in self._static))

    def compiled(self, *args: Any) -> Any:
        """The executable for these arguments' signature, compiled on first use."""
        dynamic = [a for i, a in enumerate(args) if i not in self._static]
        leaves, structure = jax.tree.flatten(dynamic)
        key = (
            tuple(args[i] for i in self._static),
            structure,
            tuple((x.shape, x.dtype, getattr(x, "sharding", None)) for x in leaves),
        )
        executable = self._compiled.get(key)
        if executable is None:
            with compile_errors():
                executable = self._jitted.lower(*args).compile()
            self._compiled[key] = executable
        return executable

    def output_shapes(self, *args: Any) -> Any:
        """The output's structure and shapes, without compiling."""
        with compile_errors():
            return jax.eval_shape(self._jitted, *args)


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
