"""Multi-process launch: one script, N local processes, one ``jax.distributed`` job.

``ttpu launch --nproc N script.py args...`` (``run`` here) starts N worker processes
on this machine. Each worker is ``python -m ttpu.launch script.py args...``
(``run_worker``): it reads the job from the environment, calls
``jax.distributed.initialize`` before any of the script's code runs, then runs the
script as ``__main__`` with ``sys.argv == [script, *args]``, as ``python script.py``
would. Process 0 hosts the coordinator on ``127.0.0.1`` (a free port unless one is
given), so every worker sees all N processes' devices in ``jax.devices()`` and its own
in ``jax.local_devices()``.

The job is described by three environment variables, ``TTPU_COORDINATOR_ADDRESS``,
``TTPU_NUM_PROCESSES`` and ``TTPU_PROCESS_ID``; ``initialize_distributed`` joins the
job they describe, so workers can also be started by hand, one per host. On CPU,
``local_devices`` sets each worker's device count (``JAX_NUM_CPU_DEVICES`` and
``--xla_force_host_platform_device_count`` in ``XLA_FLAGS``) and cross-process
collectives use gloo (``jax_cpu_collectives_implementation``).

Failures: each worker runs in its own session (process group), so it and every
process it started can be signalled together. When a worker exits with a non-zero
code, the launcher sends SIGTERM to every worker's group, SIGKILL after
``GRACE_SECONDS``, and returns the failed worker's code; workers blocked in a
collective waiting for the dead one are killed the same way. SIGINT, SIGTERM and SIGHUP
sent to the launcher stop the workers too (return code 128 + signal). A worker whose
script fails exits at once, without running ``atexit`` handlers: jax's own handler,
``jax.distributed.shutdown``, waits for every other process at a barrier. SIGKILL to
the launcher cannot be forwarded and leaves the workers running.

Output: a thread per worker pipe copies each line of the workers' stdout and stderr to
the launcher's, prefixed with ``[rank i] `` (workers run with ``PYTHONUNBUFFERED=1`` so
lines arrive as they are printed). Text without a newline (a ``\\r`` progress bar)
appears once a newline or the end of the output comes. Workers' stdin is empty.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import re
import runpy
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any, TextIO

from ttpu.errors import InvalidArgumentError

COORDINATOR_ADDRESS = "TTPU_COORDINATOR_ADDRESS"
NUM_PROCESSES = "TTPU_NUM_PROCESSES"
PROCESS_ID = "TTPU_PROCESS_ID"
GRACE_SECONDS = 3.0
_DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"
_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
_output_lock = threading.Lock()


def initialize_distributed() -> bool:
    """Join the job described by the ``TTPU_*`` variables with ``jax.distributed``.

    Does nothing (returns False) when ``jax.distributed`` is already initialized or the
    variables are absent; call it before any other jax code runs.
    """
    import jax

    if jax.distributed.is_initialized() or COORDINATOR_ADDRESS not in os.environ:
        return False
    if jax.config.jax_cpu_collectives_implementation is None:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=os.environ[COORDINATOR_ADDRESS],
        num_processes=int(os.environ[NUM_PROCESSES]),
        process_id=int(os.environ[PROCESS_ID]),
    )
    return True


def worker_env(
    rank: int, nproc: int, port: int, local_devices: int | None, base: dict[str, str]
) -> dict[str, str]:
    """The environment of worker ``rank``: ``base`` plus the job's wiring."""
    env = dict(base)
    env.update({
        COORDINATOR_ADDRESS: f"127.0.0.1:{port}",
        "JAX_COORDINATOR_BIND_ADDRESS": f"127.0.0.1:{port}",  # not every interface
        NUM_PROCESSES: str(nproc),
        PROCESS_ID: str(rank),
        "PYTHONUNBUFFERED": "1",
    })
    if local_devices is not None:
        # JAX_NUM_CPU_DEVICES wins over XLA_FLAGS in jax; both are set so neither
        # an inherited value of the other overrides the count.
        flags = re.sub(rf"{_DEVICE_COUNT_FLAG}=\S*", "", env.get("XLA_FLAGS", "")).split()
        env["XLA_FLAGS"] = " ".join([*flags, f"{_DEVICE_COUNT_FLAG}={local_devices}"])
        env["JAX_NUM_CPU_DEVICES"] = str(local_devices)
    return env


def run(
    script: str,
    args: Sequence[str] = (),
    *,
    nproc: int,
    local_devices: int | None = None,
    port: int | None = None,
) -> int:
    """Run ``script args...`` in ``nproc`` local processes joined into one jax job.

    Returns 0 when every worker exits 0, else the first failed worker's exit code
    (128 + signal for a worker killed by a signal, or for a launcher stopped by one).
    Raises InvalidArgumentError, before starting anything, on a bad argument.
    """
    if nproc < 1:
        raise InvalidArgumentError(f"--nproc must be at least 1, got {nproc}")
    if local_devices is not None and local_devices < 1:
        raise InvalidArgumentError(f"--local-devices must be at least 1, got {local_devices}")
    if port is not None and not 0 < port < 65536:
        raise InvalidArgumentError(f"--port must be in 1..65535, got {port}")
    if not Path(script).is_file():
        raise InvalidArgumentError(f"script not found: {script}")
    port = port or _free_port()
    workers: list[subprocess.Popen[bytes]] = []
    pumps: list[threading.Thread] = []
    handlers = _handle_stop_signals(_raise_stop)
    try:
        for rank in range(nproc):
            env = worker_env(rank, nproc, port, local_devices, dict(os.environ))
            worker = subprocess.Popen(
                [sys.executable, "-m", "ttpu.launch", script, *args],
                env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                stderr=subprocess.PIPE, start_new_session=True,
            )
            workers.append(worker)
            for pipe, out in ((worker.stdout, sys.stdout), (worker.stderr, sys.stderr)):
                pumps.append(_start_pump(pipe, out, f"[rank {rank}] "))
        return _wait(workers)
    except _Stop as stop:
        print(f"ttpu launch: {stop.name} received; stopping the workers", file=sys.stderr)
        return 128 + stop.signum
    finally:
        _handle_stop_signals(signal.SIG_IGN)  # let nothing interrupt the clean-up
        _stop(workers)
        deadline = time.monotonic() + GRACE_SECONDS  # a stray process may hold a pipe open
        for pump in pumps:
            pump.join(timeout=max(0.0, deadline - time.monotonic()))
        for signum, handler in handlers.items():
            if handler is not None:  # None: a handler not installed from Python
                signal.signal(signum, handler)


def run_worker(script: str, args: Sequence[str]) -> None:
    """Join the job (``initialize_distributed``), then run ``script`` as ``__main__``.

    A failing script (an exception or a non-zero ``sys.exit``) ends the process at once,
    skipping ``atexit`` handlers, so that the launcher can stop the other workers. A
    script that succeeds runs the ``atexit`` handlers (jax's distributed shutdown among
    them: a barrier with the other workers) and then exits without tearing down the
    runtime: destroying jax's CPU client joins its collective threads, and one still
    waiting on a peer that has exited hangs the process for ever (seen about once in 40
    two-process runs).
    """
    initialize_distributed()
    sys.argv = [script, *args]
    sys.path[0] = str(Path(script).resolve().parent)
    try:
        runpy.run_path(script, run_name="__main__")
    except SystemExit as exc:
        if exc.code is None or exc.code == 0:
            _finish()
        if not isinstance(exc.code, int):
            print(exc.code, file=sys.stderr)
        _exit_now(exc.code if isinstance(exc.code, int) else 1)
    except BaseException:  # as python reports an uncaught one, then exit at once
        traceback.print_exc()
        _exit_now(1)
    _finish()


def _finish() -> None:
    atexit._run_exitfuncs()
    _exit_now(0)


class _Stop(Exception):
    """The launcher received a signal that stops the job."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum
        self.name = signal.Signals(signum).name


def _raise_stop(signum: int, frame: object) -> None:
    raise _Stop(signum)


def _handle_stop_signals(handler: Any) -> dict[int, Any]:
    """Install ``handler`` for the stop signals (main thread only); return the old ones."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    return {signum: signal.signal(signum, handler) for signum in _STOP_SIGNALS}


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _start_pump(pipe: IO[bytes] | None, out: TextIO, prefix: str) -> threading.Thread:
    """Copy ``pipe`` to ``out`` line by line, each line prefixed, in a daemon thread."""

    def pump() -> None:
        assert pipe is not None
        with pipe:
            for line in iter(pipe.readline, b""):
                text = prefix + line.decode(errors="replace").rstrip("\n") + "\n"
                with _output_lock, contextlib.suppress(OSError, ValueError):
                    out.write(text)  # a closed terminal must not stop the draining
                    out.flush()

    thread = threading.Thread(target=pump, daemon=True)
    thread.start()
    return thread


def _wait(workers: list[subprocess.Popen[bytes]]) -> int:
    """Wait until every worker exits 0 (return 0) or one fails (return its code)."""
    while True:
        codes = [worker.poll() for worker in workers]
        for rank, code in enumerate(codes):
            if code:
                how = f"code {code}" if code > 0 else f"signal {signal.Signals(-code).name}"
                print(f"ttpu launch: rank {rank} exited with {how}; stopping the workers",
                      file=sys.stderr, flush=True)
                return code if code > 0 else 128 - code
        if all(code == 0 for code in codes):
            return 0
        time.sleep(0.05)


def _stop(workers: list[subprocess.Popen[bytes]]) -> None:
    """SIGTERM every worker's process group, SIGKILL whatever is left after the grace
    period, and reap the workers."""
    _signal_groups(workers, signal.SIGTERM)
    deadline = time.monotonic() + GRACE_SECONDS
    for worker in workers:
        with contextlib.suppress(subprocess.TimeoutExpired):
            worker.wait(timeout=max(0.0, deadline - time.monotonic()))
    _signal_groups(workers, signal.SIGKILL)  # also the workers' children still running
    for worker in workers:
        worker.wait()


def _signal_groups(workers: list[subprocess.Popen[bytes]], signum: int) -> None:
    for worker in workers:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(worker.pid, signum)


def _exit_now(code: int) -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit("usage: python -m ttpu.launch SCRIPT [ARGS...]  (a worker of `ttpu launch`)")
    run_worker(sys.argv[1], sys.argv[2:])
