"""Benchmark ttpu's sharding strategies on Gemma 3 270M: memory per device, peak host
memory while loading, compile and decode time, and whether the tokens stay the same.

For each strategy (one device, "dp", "fsdp", "tp", "2d", "3d") it measures:

* load: in a fresh subprocess per strategy (this script re-run with ``--measure-load``),
  after importing ttpu and setting up the backend, the peak resident set size (VmHWM,
  reset through /proc/self/clear_refs) minus the RSS before ``from_pretrained``, in MiB
  and as a multiple of the checkpoint file size; and the load time. Both include waiting
  for the weights to reach the devices (``jax.block_until_ready(model.params)``). The
  virtual CPU devices keep their buffers in host memory, so the peak counts the weights
  on all 8 devices (8 copies for "dp"), not what one TPU device would hold;
* weights: bytes per device and their share of the total (``describe_sharding``);
* generation: greedy, 8 different left-padded prompts, 32 new tokens (``--quick``: 8):
  the first call (trace + compile + run), then decode tokens/s of a second, timed call
  (batch * new tokens / its time), and whether its tokens equal the single-device ones.

It runs on 8 virtual CPU devices (``XLA_FLAGS=--xla_force_host_platform_device_count=8``,
unless XLA_FLAGS already sets a device count) and turns ttpu's persistent compile cache
off (unless TTPU_COMPILE_CACHE is set), so "first call" always includes compiling.
The 8 virtual devices share the machine's CPU cores (2 on the development machine), so
sharded decode is slower than single-device here: the numbers show memory and
correctness, not TPU speed. Needs Linux (/proc) for the load-memory measurement.

Usage::

    python benchmarks/sharding.py [--quick] [--json] [--table]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("TTPU_COMPILE_CACHE", "off")

import jax  # after XLA_FLAGS is set
import numpy as np

from ttpu.sharding import strategies as sharding_strategies

MODEL = "gemma-3-270m"
# One device, then every fixed strategy of the library ("auto" picks one of them).
STRATEGIES = {"single": None, **{name: name for name in sharding_strategies.STRATEGIES if name != "auto"}}
MIB = 1 << 20
PROMPTS = [
    "The capital of France is",
    "Water boils at a temperature of",
    "My favourite way to spend a rainy afternoon is",
    "The three primary colours are",
    "Once upon a time, in a small village by the sea,",
    "To make a good cup of tea, first",
    "The largest planet in the solar system",
    "A haiku about autumn leaves:",
]


def log(message: str) -> None:
    """Progress goes to stderr, so stdout holds only the report."""
    print(message, file=sys.stderr, flush=True)


def proc_status_kib(field: str) -> int:
    """A ``kB`` field of /proc/self/status (VmRSS, VmHWM)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def measure_load(strategy: str) -> dict:
    """In this (fresh) process: peak RSS growth and time of ``from_pretrained``."""
    import ttpu
    from ttpu import AutoModelForTPU

    ttpu.backends.get_backend("jax")
    jax.devices()  # imports and device setup are not loading
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    before = proc_status_kib("VmRSS")
    start = time.perf_counter()
    model = AutoModelForTPU.from_pretrained(MODEL, parallelism=STRATEGIES[strategy])
    jax.block_until_ready(model.params)  # transfers to the devices are asynchronous
    seconds = time.perf_counter() - start
    peak = proc_status_kib("VmHWM")
    del model
    return {"load_s": seconds, "peak_load_mib": (peak - before) / 1024}


def load_in_subprocess(strategy: str) -> dict:
    command = [sys.executable, os.path.abspath(__file__), "--measure-load", strategy]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"--measure-load {strategy} failed ({done.returncode}):\n{done.stderr[-6000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure_strategy(strategy: str, new_tokens: int, reference: np.ndarray | None) -> tuple[dict, np.ndarray, str]:
    """Load with ``strategy`` in this process; sharding, first call and decode rate."""
    from ttpu import AutoModelForTPU, describe_sharding

    model = AutoModelForTPU.from_pretrained(MODEL, parallelism=STRATEGIES[strategy])
    jax.block_until_ready(model.params)
    table = describe_sharding(model)
    tokenizer = model.tokenizer
    tokenizer.padding_side = "left"
    batch = tokenizer(PROMPTS, padding=True, return_tensors="np")
    ids, mask = batch["input_ids"], batch["attention_mask"]

    def generate() -> np.ndarray:
        return np.asarray(model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False))

    start = time.perf_counter()
    generate()
    first_s = time.perf_counter() - start
    start = time.perf_counter()
    tokens = generate()
    timed_s = time.perf_counter() - start
    new = tokens.shape[1] - ids.shape[1]
    row = {
        "mesh": str(table.plan.mesh),
        "mib_per_device": table.bytes_per_device / MIB,
        "share": table.bytes_per_device / table.total_bytes,
        "total_mib": table.total_bytes / MIB,
        "first_call_s": first_s,
        "decode_tok_s": len(PROMPTS) * new / timed_s,
        "new_tokens": new,
        "compiles": model.compile_count,
        "same_tokens": True if reference is None else bool(np.array_equal(tokens, reference)),
    }
    return row, tokens, str(table) if strategy == "fsdp" else ""


def markdown(rows: list[dict]) -> str:
    header = ["strategy", "mesh", "load s", "peak load MiB", "peak / checkpoint", "MiB per device",
              "% of total", "first call s", "decode tok/s (batch 8)", "same tokens"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for r in rows:
        cells = [r["strategy"], r["mesh"], f"{r['load_s']:.1f}", f"{r['peak_load_mib']:.0f}",
                 f"{r['peak_over_checkpoint']:.2f}x", f"{r['mib_per_device']:.1f}", f"{100 * r['share']:.1f}%",
                 f"{r['first_call_s']:.1f}", f"{r['decode_tok_s']:.1f}", "yes" if r["same_tokens"] else "no"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="8 new tokens instead of 32")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON instead of a table")
    parser.add_argument("--table", action="store_true", help="also print the fsdp describe_sharding table")
    parser.add_argument("--measure-load", choices=STRATEGIES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure_load:
        print(json.dumps(measure_load(args.measure_load)))
        return

    from ttpu.models import offline_model_dir

    started = time.perf_counter()
    checkpoint = (offline_model_dir(MODEL) / "model.safetensors").stat().st_size
    new_tokens = 8 if args.quick else 32
    rows, reference, fsdp_table = [], None, ""
    for strategy in STRATEGIES:
        log(f"[{strategy}] peak memory of loading, in a fresh process")
        load = load_in_subprocess(strategy)
        log(f"[{strategy}] loading, generating {new_tokens} tokens x {len(PROMPTS)} prompts")
        row, tokens, text = measure_strategy(strategy, new_tokens, reference)
        gc.collect()  # the model went out of scope with measure_strategy; free it before the next
        reference = tokens if reference is None else reference
        fsdp_table = text or fsdp_table
        rows.append({"strategy": strategy, **load, "peak_over_checkpoint": load["peak_load_mib"] * MIB / checkpoint,
                     **row})
        log(f"[{strategy}] tokens identical to single device: {'yes' if row['same_tokens'] else 'no'}")
    total_s = time.perf_counter() - started
    if args.json:
        print(json.dumps({"checkpoint_bytes": checkpoint, "devices": jax.device_count(),
                          "new_tokens": new_tokens, "total_s": total_s, "rows": rows}, indent=2))
        return
    print(f"ttpu sharding benchmark: {MODEL}, checkpoint {checkpoint / MIB:.0f} MiB ({checkpoint} bytes)")
    print(f"devices: {jax.device_count()} x {jax.devices()[0].platform} ({os.cpu_count()} CPU cores), "
          f"jax {jax.__version__}; greedy, batch {len(PROMPTS)}, {new_tokens} new tokens")
    print(f"command: {shlex.join([os.path.basename(sys.executable), *sys.argv])}\n")
    print(markdown(rows))
    print(f"\ntotal benchmark time {total_s:.0f} s")
    if args.table:
        print(f"\n## describe_sharding, fsdp\n\n{fsdp_table}")


if __name__ == "__main__":
    main()
