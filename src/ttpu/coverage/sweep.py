"""Run many model types in worker subprocesses, each with a timeout (a crash or hang
ends only that model type)."""

from __future__ import annotations

import multiprocessing
import os
import random
import re
import time
import warnings
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from multiprocessing.connection import wait as wait_connections
from typing import Any

from ttpu.coverage.run import error_info, run_one

DEFAULT_TIMEOUT = 120.0
TASKS_PER_WORKER = 25  # recycle workers to bound memory growth and state leaks


def all_model_types() -> list[str]:
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    return sorted(CONFIG_MAPPING_NAMES)


def select_model_types(selection: str | Sequence[str] | None, sample: int | None = None,
                       seed: int = 0) -> list[str]:
    """All model types, or those matching a regex / in a list, optionally sampled."""
    types = all_model_types()
    if selection:
        if isinstance(selection, str):
            pattern = re.compile(selection)
            types = [t for t in types if pattern.search(t)]
        else:
            wanted = set(selection)
            types = [t for t in types if t in wanted]
    if sample and sample < len(types):
        types = sorted(random.Random(seed).sample(types, sample))
    return types


def _worker_main(conn: Any) -> None:
    worker_env()  # in the worker only (before it imports jax): the caller's process keeps its own
    warnings.simplefilter("ignore")
    import logging

    logging.disable(logging.WARNING)
    try:
        import torch

        torch.set_num_threads(1)
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
    except Exception:  # noqa: BLE001
        pass
    while True:
        try:
            task = conn.recv()
        except EOFError:
            return
        if task is None:
            return
        try:
            result = run_one(task)
        except BaseException as exc:  # noqa: BLE001
            result = {"model_type": task, "stage": "harness", "error": error_info(exc),
                      "eager": False, "compiles": False, "matches": False}
        conn.send(result)


@dataclass
class _Worker:
    process: Any
    conn: Any
    task: str | None = None
    started: float = 0.0
    done: int = 0


def worker_env() -> None:
    """Settings of a process that runs model types: caches off, one thread per op."""
    # Hundreds of one-off tiny models: nothing worth keeping in the user's caches.
    os.environ.setdefault("TTPU_COMPILE_CACHE", "off")
    os.environ.setdefault("TTPU_PROGRAM_CACHE", "off")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1")


def _spawn(ctx: Any) -> _Worker:
    parent, child = ctx.Pipe()
    process = ctx.Process(target=_worker_main, args=(child,), daemon=True)
    process.start()
    child.close()
    return _Worker(process, parent)


def _stop(worker: _Worker, kill: bool = False) -> None:
    if kill:
        worker.process.kill()
    else:
        try:
            worker.conn.send(None)
        except Exception:  # noqa: BLE001
            worker.process.kill()
    worker.process.join(5)
    if worker.process.is_alive():
        worker.process.kill()
        worker.process.join(5)
    worker.conn.close()


def sweep(model_types: Sequence[str], workers: int = 2, timeout: float = DEFAULT_TIMEOUT,
          progress: bool = True, on_result: Any = None) -> list[dict[str, Any]]:
    """Run ``run_one`` for each model type in worker subprocesses."""
    ctx = multiprocessing.get_context("spawn")
    pending = list(model_types)
    results: list[dict[str, Any]] = []
    pool: list[_Worker] = []
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(pending), desc="coverage", unit="model", dynamic_ncols=True)
    counts: Counter = Counter()

    def finish(result: dict[str, Any]) -> None:
        results.append(result)
        counts["match"] += bool(result.get("matches"))
        counts["eager"] += bool(result.get("eager"))
        if on_result:
            on_result(result)
        if bar:
            bar.set_postfix(match=counts["match"], eager=counts["eager"], last=result["model_type"])
            bar.update(1)

    try:
        while pending or any(w.task for w in pool):
            while len(pool) < min(workers, len(pending) + sum(1 for w in pool if w.task)):
                pool.append(_spawn(ctx))
            for w in pool:
                if w.task is None and pending:
                    w.task, w.started = pending.pop(0), time.time()
                    w.conn.send(w.task)
            busy = [w for w in pool if w.task]
            if not busy:
                break
            ready = wait_connections([w.conn for w in busy], timeout=1.0)
            now = time.time()
            for w in list(busy):
                result = None
                if w.conn in ready:
                    try:
                        result = w.conn.recv()
                    except (EOFError, OSError):
                        result = None
                    if result is not None:
                        result.setdefault("times", {})["total"] = round(now - w.started, 2)
                        finish(result)
                        w.task, w.done = None, w.done + 1
                        if w.done >= TASKS_PER_WORKER:
                            _stop(w)
                            pool.remove(w)
                        continue
                if (result is None and w.conn in ready) or not w.process.is_alive():
                    finish({"model_type": w.task, "stage": "crash", "eager": False, "compiles": False,
                            "matches": False, "error": {"type": "WorkerCrash",
                                                        "message": f"exit code {w.process.exitcode}"}})
                    _stop(w, kill=True)
                    pool.remove(w)
                elif now - w.started > timeout:
                    finish({"model_type": w.task, "stage": "timeout", "eager": None, "compiles": False,
                            "matches": False, "error": {"type": "Timeout",
                                                        "message": f"no result within {timeout:.0f} s"}})
                    _stop(w, kill=True)
                    pool.remove(w)
    finally:
        for w in pool:
            _stop(w, kill=w.task is not None)
        if bar:
            bar.close()
    order = {t: i for i, t in enumerate(model_types)}
    results.sort(key=lambda r: order.get(r["model_type"], 0))
    return results


