"""Warm start: the programs a model ran last time are compiled before they are asked for.

Reading a stored program back (``jax.export``) and fetching its executable from jax's
persistent cache takes about a second per program on XLA:CPU, and the first run of an
executable that holds matrix-matrix products costs about as much again (XLA:CPU builds
its YNNPACK kernels on first use). A :class:`WarmUp` does both off the caller's path:

1. while the weights are still being placed, a background thread compiles each of the
   model's recently used programs (:meth:`ProgramStore.recent`) against the weights'
   shapes and shardings, which need no weight values;
2. once the weights are placed (:meth:`weights_placed`), it dispatches one run of each
   executable on zero inputs and the real weights (asynchronously: the caller goes on
   loading the tokenizer while XLA runs them on the other cores; only zeros are donated).

:meth:`take` hands an executable over when a program is first needed (waiting for it if
its compilation is still under way). A program that fails to warm up is compiled as
usual when needed.
"""

from __future__ import annotations

import concurrent.futures
import logging
import threading
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ttpu.backends.jax.program_store import ArgumentSpec, ProgramStore, RecentProgram, StoredProgram, compile_program

logger = logging.getLogger(__name__)

WarmProgram = tuple[StoredProgram, Any]  # the stored program and its executable


class WarmUp:
    """Background compilation of ``store``'s recent programs for a model whose weights
    are described (shape, dtype, sharding) by ``weights``."""

    def __init__(self, store: ProgramStore, weights: Mapping[str, jax.ShapeDtypeStruct], mesh: jax.sharding.Mesh) -> None:
        self._store = store
        self._mesh = mesh
        self._weights = dict(weights)
        self._lock = threading.Lock()
        self._placed: dict[str, jax.Array] | None = None  # the weights, once placed
        self._weight_names: dict[int, str] = {}
        self._not_run: dict[str, tuple[RecentProgram, Any]] = {}  # compiled before the weights were placed
        self._futures: dict[str, concurrent.futures.Future[WarmProgram]] = {}
        self.taken = 0  # executables handed over by take()
        recent = [p for p in store.recent() if all(a.weight is None or a.weight in weights for a in p.arguments)]
        if recent:
            pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="ttpu-warm-up")
            for program in reversed(recent):  # the most recent first
                self._futures[program.key] = pool.submit(self._compile, program)
            pool.shutdown(wait=False)

    def weights_placed(self, params: Mapping[str, jax.Array]) -> None:
        """The weights are placed: the programs compiled so far start their first run
        (asynchronously), the others as soon as they are compiled."""
        with self._lock:
            self._placed = dict(params)
            self._weight_names = {id(array): name for name, array in params.items()}
            compiled, self._not_run = list(self._not_run.values()), {}
        for program, executable in compiled:
            self._run_once(program, executable)

    def cancel(self) -> None:
        """The weights will never be placed (loading failed): compile nothing more."""
        for future in self._futures.values():
            future.cancel()

    def take(self, key: str) -> WarmProgram | None:
        """The warmed program under ``key`` (waiting for it if under way), or None."""
        future = self._futures.pop(key, None)
        if future is None:
            return None
        try:
            warm = future.result()
        except Exception as exc:  # compiled as usual instead
            logger.debug("warm-up of program %s failed (%s: %s)", key, type(exc).__name__, exc)
            return None
        self.taken += 1
        return warm

    def record(self, key: str, leaves: list[Any], donated: tuple[int, ...]) -> None:
        """Remember that program ``key`` runs on arguments like ``leaves`` (the weights
        by name), for the next process's warm-up."""
        self._store.note_used(RecentProgram(key, describe_arguments(leaves, self._weight_names), donated))

    def _compile(self, program: RecentProgram) -> WarmProgram:
        stored = self._store.load(program.key)
        if stored is None or stored.exported is None:
            raise LookupError("no longer stored")
        shapes = [self._abstract(a) for a in program.arguments]
        executable = compile_program(stored, shapes, program.donated, None)
        with self._lock:
            placed = self._placed is not None
            if not placed:
                self._not_run[program.key] = (program, executable)
        if placed:
            self._run_once(program, executable)
        return stored, executable

    def _run_once(self, program: RecentProgram, executable: Any) -> None:
        """Dispatch one run on zeros and the real weights (XLA builds its kernels on an
        executable's first run); only the zeros are donated, the result is dropped."""
        assert self._placed is not None
        try:
            executable(*[self._placed[a.weight] if a.weight else self._zeros(a) for a in program.arguments])
        except Exception as exc:  # the real call will tell
            logger.debug("first run of program %s failed (%s: %s)", program.key, type(exc).__name__, exc)

    def _abstract(self, argument: ArgumentSpec) -> jax.ShapeDtypeStruct:
        if argument.weight is not None:
            return self._weights[argument.weight]
        sharding = jax.sharding.NamedSharding(self._mesh, jax.sharding.PartitionSpec(*argument.spec))
        if argument.dtype.startswith("key<"):
            return jax.ShapeDtypeStruct(argument.shape, jax.eval_shape(jax.random.key, 0).dtype, sharding=sharding)
        return jax.ShapeDtypeStruct(argument.shape, jnp.dtype(argument.dtype), sharding=sharding)

    def _zeros(self, argument: ArgumentSpec) -> jax.Array:
        """Zeros shaped and laid out as ``argument`` (host zeros copied over: jnp.zeros
        would compile a little program per shape)."""
        abstract = self._abstract(argument)
        if argument.dtype.startswith("key<"):
            data = jax.random.key_data(jax.random.key(0))  # PRNG keys of the default implementation
            zeros = jax.device_put(np.zeros((*argument.shape, *data.shape), data.dtype), abstract.sharding)
            return jax.random.wrap_key_data(zeros)
        return jax.device_put(np.zeros(abstract.shape, abstract.dtype), abstract.sharding)


def describe_arguments(leaves: list[Any], weight_names: Mapping[int, str]) -> tuple[ArgumentSpec, ...]:
    """How a program's flat arguments are recorded (``weight_names``: id of each placed
    weight array -> its name)."""
    described = []
    for leaf in leaves:
        sharding = getattr(leaf, "sharding", None)
        spec = tuple(sharding.spec) if isinstance(sharding, jax.sharding.NamedSharding) else ()
        described.append(ArgumentSpec(tuple(leaf.shape), str(leaf.dtype), spec, weight_names.get(id(leaf))))
    return tuple(described)
