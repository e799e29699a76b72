"""``ttpu launch``: local multi-process jax.distributed jobs on CPU devices."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from ttpu import launch

MESH_SCRIPT = """
    import json, sys
    import numpy as np
    import jax, jax.numpy as jnp
    from jax.experimental import multihost_utils
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    out_dir, *rest = sys.argv[1:]
    mesh = Mesh(np.array(jax.devices()), ("x",))
    a = np.arange(8 * 16, dtype=np.float32).reshape(8, 16) / 100
    b = np.arange(16 * 4, dtype=np.float32).reshape(16, 4) / 10
    # the contraction dimension is sharded over all 8 devices of both processes
    ga = jax.make_array_from_callback(a.shape, NamedSharding(mesh, P(None, "x")), lambda i: a[i])
    gb = jax.make_array_from_callback(b.shape, NamedSharding(mesh, P("x", None)), lambda i: b[i])
    replicated = NamedSharding(mesh, P())
    product = jax.jit(lambda x, y: x @ y, out_shardings=replicated)(ga, gb)
    total = jax.jit(jnp.sum, out_shardings=replicated)(ga)
    ranks = multihost_utils.process_allgather(np.int32(jax.process_index()))
    with open(f"{out_dir}/rank{jax.process_index()}.json", "w") as f:
        json.dump({
            "argv": sys.argv, "process_count": jax.process_count(),
            "device_count": jax.device_count(), "local_device_count": jax.local_device_count(),
            "product": np.asarray(product.addressable_data(0)).tolist(),
            "total": float(total.addressable_data(0)), "ranks": np.asarray(ranks).tolist(),
        }, f)
    # stderr: gloo's C++ threads write to stdout concurrently and can split a line there.
    print("done", jax.process_index(), file=sys.stderr)
"""

# Writes "pid child_pid" (the child is a stray `sleep`), then process 1 fails while
# process 0 blocks in a collective that waits for process 1's devices.
CRASH_SCRIPT = """
    import os, subprocess, sys, time
    import numpy as np
    import jax, jax.numpy as jnp
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    child = subprocess.Popen(["sleep", "60"])
    with open(f"{sys.argv[1]}/pids{jax.process_index()}", "w") as f:
        f.write(f"{os.getpid()} {child.pid}")
    if jax.process_index() == 1:
        time.sleep(1)
        sys.exit(3)
    mesh = Mesh(np.array(jax.devices()), ("x",))
    ones = np.ones(jax.device_count(), np.float32)
    x = jax.make_array_from_callback(ones.shape, NamedSharding(mesh, P("x")), lambda i: ones[i])
    print(jax.jit(jnp.sum, out_shardings=NamedSharding(mesh, P()))(x))
    time.sleep(60)
"""


def write_script(tmp_path: Path, code: str) -> Path:
    script = tmp_path / "script.py"
    script.write_text(textwrap.dedent(code))
    return script


def ttpu_launch(*argv: str | Path) -> list[str | Path]:
    return [sys.executable, "-m", "ttpu.cli", "launch", *argv]


def pids(directory: Path) -> list[int]:
    return [int(p) for path in directory.glob("pids*") for p in path.read_text().split()]


def alive(pid: int) -> bool:
    """Whether ``pid`` runs; a zombie (dead, not reaped yet by init) does not."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return not Path("/proc").is_dir()


def assert_all_dead(processes: list[int]) -> None:
    deadline = time.monotonic() + 5  # init may take a moment to reap the orphaned `sleep`s
    while any(alive(pid) for pid in processes) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert [pid for pid in processes if alive(pid)] == []


def test_two_processes_form_one_global_mesh(tmp_path) -> None:
    script = write_script(tmp_path, MESH_SCRIPT)
    argv = ttpu_launch("--nproc", "2", "--local-devices", "4", script, tmp_path, "--foo", "a b")
    result = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert {"[rank 0] done 0", "[rank 1] done 1"} <= set(result.stderr.splitlines()), result.stderr
    a = np.arange(8 * 16, dtype=np.float32).reshape(8, 16) / 100
    b = np.arange(16 * 4, dtype=np.float32).reshape(16, 4) / 10
    for rank in (0, 1):
        seen = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert seen["argv"] == [str(script), str(tmp_path), "--foo", "a b"]
        assert (seen["process_count"], seen["device_count"], seen["local_device_count"]) == (2, 8, 4)
        np.testing.assert_allclose(seen["product"], a @ b, rtol=1e-5)
        assert seen["total"] == pytest.approx(a.sum(), rel=1e-5)
        assert seen["ranks"] == [0, 1]


def test_a_failing_worker_stops_the_job_with_its_exit_code(tmp_path) -> None:
    script = write_script(tmp_path, CRASH_SCRIPT)
    start = time.monotonic()
    result = subprocess.run(ttpu_launch("--nproc", "2", "--local-devices", "2", script, tmp_path),
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 3, result.stderr
    assert time.monotonic() - start < 20
    assert "rank 1 exited with code 3" in result.stderr
    assert len(pids(tmp_path)) == 4
    assert_all_dead(pids(tmp_path))


def test_sigterm_to_the_launcher_stops_every_worker(tmp_path) -> None:
    script = write_script(tmp_path, CRASH_SCRIPT.replace("sys.exit(3)", "time.sleep(60)"))
    argv = ttpu_launch("--nproc", "2", "--local-devices", "2", script, tmp_path)
    launcher = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while len(pids(tmp_path)) < 4 and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(0.5)  # process 0 is now in the collective, process 1 asleep
    assert launcher.poll() is None
    launcher.send_signal(signal.SIGTERM)
    _, err = launcher.communicate(timeout=20)
    assert launcher.returncode == 128 + signal.SIGTERM, err
    assert "SIGTERM received" in err
    assert_all_dead(pids(tmp_path))


@pytest.mark.parametrize("argv, message", [
    (["--nproc", "0", "{script}"], "--nproc must be at least 1"),
    (["--nproc", "2", "--local-devices", "0", "{script}"], "--local-devices must be at least 1"),
    (["--nproc", "2", "{missing}"], "script not found"),
])
def test_bad_arguments_exit_2_before_starting_anything(tmp_path, argv, message) -> None:
    script = write_script(tmp_path, "open(__file__ + '.ran', 'w')")
    argv = [arg.format(script=script, missing=tmp_path / "missing.py") for arg in argv]
    result = subprocess.run(ttpu_launch(*argv), capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert message in result.stderr
    assert not Path(f"{script}.ran").exists()


def test_worker_env_sets_the_device_count_and_keeps_other_xla_flags() -> None:
    base = {"XLA_FLAGS": "--xla_dump_to=/tmp/d --xla_force_host_platform_device_count=8"}
    env = launch.worker_env(1, 2, 1234, 4, base)
    assert env["XLA_FLAGS"] == "--xla_dump_to=/tmp/d --xla_force_host_platform_device_count=4"
    assert env["JAX_NUM_CPU_DEVICES"] == "4"
    assert (env[launch.COORDINATOR_ADDRESS], env[launch.NUM_PROCESSES], env[launch.PROCESS_ID]) == (
        "127.0.0.1:1234", "2", "1")
    assert launch.worker_env(0, 2, 1234, None, base)["XLA_FLAGS"] == base["XLA_FLAGS"]


def test_initialize_distributed_does_nothing_outside_a_job(monkeypatch) -> None:
    monkeypatch.delenv(launch.COORDINATOR_ADDRESS, raising=False)
    assert launch.initialize_distributed() is False


MODEL_SCRIPT = """
    import sys
    import jax, numpy as np
    from ttpu import AutoModelForTPU

    model_dir, out_dir, parallelism = sys.argv[1:]
    model = AutoModelForTPU.from_pretrained(model_dir, parallelism=parallelism)
    ids = np.load(f"{out_dir}/ids.npy")
    logits = np.asarray(model(input_ids=ids).logits)
    tokens = model.generate(ids, max_new_tokens=6)
    shards = {d.process_index for a in model.params.values() for d in a.sharding.device_set}
    np.savez(f"{out_dir}/rank{jax.process_index()}.npz", logits=logits, tokens=tokens,
             devices=model.sharding.mesh.device_count, processes=len(shards))
"""


@pytest.mark.parametrize("parallelism", ["fsdp", "tp"])
def test_a_model_sharded_over_two_processes_matches_one_process(tmp_path, parallelism) -> None:
    from test_loading import tiny_llama

    from ttpu import AutoModelForTPU

    tiny_llama().save_pretrained(tmp_path / "model")
    ids = np.random.default_rng(0).integers(1, 32, (4, 9))
    np.save(tmp_path / "ids.npy", ids)
    script = write_script(tmp_path, MODEL_SCRIPT)
    argv = ttpu_launch("--nproc", "2", "--local-devices", "4", script, tmp_path / "model", tmp_path, parallelism)
    result = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    single = AutoModelForTPU.from_pretrained(tmp_path / "model")
    expected_logits = np.asarray(single(input_ids=ids).logits)
    expected_tokens = single.generate(ids, max_new_tokens=6)
    for rank in (0, 1):
        seen = np.load(tmp_path / f"rank{rank}.npz")
        assert (int(seen["devices"]), int(seen["processes"])) == (8, 2)
        error = np.linalg.norm(seen["logits"] - expected_logits) / np.linalg.norm(expected_logits)
        assert error <= 1e-5
        np.testing.assert_array_equal(seen["tokens"], expected_tokens)
