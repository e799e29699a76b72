"""Benchmark ttpu's compiled ``generate`` against eager transformers, in one run.

``--backend torch_xla`` measures the torch_xla backend next to the JAX backend, in the
same run and on the same model (run it in the torch_xla environment, which holds both:
``$(bash scripts/install-torch-xla.sh)/bin/python benchmarks/generate.py --backend torch_xla``).

Measures, on whatever machine JAX runs on:

* memory bandwidth (a jitted ``jnp.sum`` and a matrix-vector product over 1 GiB) and
  the batch-1 decode roofline it implies (every weight is read once per decode step);
* per backend, compile time of the first ``generate`` call in a fresh process, with a
  cold and then a warm persistent compile cache;
* prefill tokens/s (a long prompt, ``max_new_tokens=1``);
* decode tokens/s per batch size, from the difference of two timed generations with
  different numbers of new tokens that share one KV-cache bucket (so both calls run
  the same executables and the prefill cancels out);
* the same prefill and decode measurements for the model in eager PyTorch, run right
  after ttpu's for each row (the machine's load drifts; neighbouring rows compare best).

Every timing is the best of ``--repeats`` calls after an untimed warm-up of the same
shape. The benchmark compiles into a private temporary compile cache (deleted on exit)
and writes nothing else, except the results as JSON with ``--json PATH``.

Usage::

    python benchmarks/generate.py [--model gemma-3-270m] [--new-tokens 64]
        [--batches 1,8,32] [--backend jax] [--quick] [--json PATH]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers

from ttpu import AutoModelForTPU, BucketPolicy
from ttpu.generation.generate import cache_length
from ttpu.models import resolve
from ttpu.paths import COMPILE_CACHE_ENV, PROGRAM_CACHE_ENV

GIB = 1 << 30
PARAGRAPH = (
    "The history of computing is a story of machines that learned to do more with less. "
    "Early calculators filled entire rooms and consumed enormous amounts of power, yet "
    "they could only add, subtract and multiply a few numbers per second. Over the "
    "following decades, engineers replaced vacuum tubes with transistors, transistors "
    "with integrated circuits, and integrated circuits with processors containing "
    "billions of switches etched onto a sliver of silicon. Each step made computers "
    "smaller, cheaper and faster, and each opened new fields of science and industry. "
)
DEFAULTS = {"new_tokens": 64, "batches": "1,8,32", "prefill_tokens": 500, "prefill_batches": "1,8"}
QUICK = {"new_tokens": 16, "batches": "1,2", "prefill_tokens": 100, "prefill_batches": "1,2"}


def log(message: str) -> None:
    """Progress goes to stderr, so stdout holds only the table."""
    print(message, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- arguments


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line options; ``--quick`` changes the defaults of the size options."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="gemma-3-270m", help="offline alias, directory or hub id")
    parser.add_argument(
        "--backend", default="jax", choices=["jax", "torch_xla"],
        help="ttpu backend (default: jax); torch_xla is measured next to jax",
    )
    parser.add_argument("--new-tokens", type=int, help="new tokens of the longer decode run (default 64)")
    parser.add_argument("--batches", help="decode batch sizes, comma-separated (default 1,8,32)")
    parser.add_argument("--prefill-tokens", type=int, help="prompt length for prefill (default 500)")
    parser.add_argument("--prefill-batches", help="prefill batch sizes (default 1,8)")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per measurement (best is kept)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 16 new tokens, batches 1,2")
    parser.add_argument("--json", type=Path, help="also write the results to this JSON file")
    parser.add_argument("--compile-probe", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for name, default in (QUICK if args.quick else DEFAULTS).items():
        if getattr(args, name) is None:
            setattr(args, name, default)
    args.backends = ["jax"] if args.backend == "jax" else ["jax", args.backend]
    args.batches = _int_list(args.batches)
    args.prefill_batches = _int_list(args.prefill_batches)
    if args.new_tokens < 3:
        parser.error("--new-tokens must be at least 3")
    return args


def _int_list(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part.strip()]


# ----------------------------------------------------------------------------- results


@dataclasses.dataclass
class Bandwidth:
    """GB/s of the two memory-bound programs; the faster one is the machine's bandwidth."""

    sum_gbps: float
    matvec_gbps: float

    @property
    def best_gbps(self) -> float:
        return max(self.sum_gbps, self.matvec_gbps)


@dataclasses.dataclass
class CompileProbe:
    """One fresh process: model load, first generate call, then the same call warm."""

    load_s: float
    first_call_s: float
    steady_s: float
    executables: int
    cache_files_added: int = 0  # by this process: 0 when every executable came from the cache


@dataclasses.dataclass
class Prefill:
    """Best time of a generation with one new token (prefill + first token)."""

    batch: int
    seconds: float
    tokens_per_s: float
    recompiles: int  # executables compiled during the timed calls (0 after the warm-up)


@dataclasses.dataclass
class Decode:
    """Best times of the short and long generations, and the decode rate they imply."""

    batch: int
    short_s: float
    long_s: float
    tokens_per_s: float
    recompiles: int


@dataclasses.dataclass
class BackendResults:
    """Everything measured for one implementation (ttpu on a backend, or eager)."""

    prefill: list[Prefill]
    decode: list[Decode]
    batch1_tokens: list[int]  # the batch-1 greedy continuation of the longer decode run


@dataclasses.dataclass
class DecodePlan:
    """Prompt and new-token counts for the decode measurement: both generations
    (``short`` and ``long`` new tokens) fall in one KV-cache bucket."""

    prompt_tokens: int
    prompt_bucket: int
    short: int
    long: int
    cache_length: int


# ----------------------------------------------------------------------------- helpers


def plan_decode(new_tokens: int) -> DecodePlan:
    """Pad the prompt to the power of two >= ``new_tokens``: then every count from 1 to
    ``new_tokens`` new tokens lands in the same cache bucket (twice the prompt bucket),
    and the short run can be as short as 1/8 of the long one."""
    buckets = BucketPolicy()  # generate() pads prompts to these sequence buckets
    bucket = buckets.round_up(new_tokens, buckets.sequence)
    short = max(2, new_tokens // 8)
    plan = DecodePlan(bucket * 3 // 4, bucket, short, new_tokens, cache_length(bucket, new_tokens))
    assert cache_length(bucket, short) == plan.cache_length and short < new_tokens
    return plan


def cpu_seconds() -> tuple[float, float] | None:
    """CPU seconds used so far by the whole machine (steal included) and by this process
    with its finished children; None where /proc/stat is missing (not Linux)."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    except OSError:
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(f) for f in fields[:8])
    machine = (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")
    own = os.times()
    return machine, own.user + own.system + own.children_user + own.children_system


def other_cpu_seconds(start: tuple[float, float] | None, end: tuple[float, float] | None) -> float | None:
    """CPU seconds that other processes (and the hypervisor's steal) used in between."""
    if start is None or end is None:
        return None
    return max(0.0, (end[0] - start[0]) - (end[1] - start[1]))


def best_time(call: Callable[[], Any], repeats: int) -> tuple[float, Any]:
    """The fastest of ``repeats`` calls (seconds) and the last call's result."""
    best, result = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        result = call()
        best = min(best, time.perf_counter() - start)
    return best, result


def token_stream(tokenizer: Any, length: int) -> list[int]:
    """At least ``length`` token ids of the repeated paragraph (no special tokens)."""
    text = PARAGRAPH
    while len(ids := tokenizer(text, add_special_tokens=False)["input_ids"]) < length:
        text += PARAGRAPH
    return ids


def make_prompts(tokenizer: Any, batch: int, length: int) -> tuple[np.ndarray, np.ndarray]:
    """``batch`` distinct prompts of ``length`` tokens (BOS + a window of the paragraph
    starting at a different offset per row), with their all-ones attention mask."""
    stride = 7
    stream = token_stream(tokenizer, length + stride * batch)
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    rows = [bos + stream[i * stride : i * stride + length - len(bos)] for i in range(batch)]
    ids = np.asarray(rows, np.int64)
    return ids, np.ones_like(ids)


# ----------------------------------------------------------------------------- measurements


def measure_bandwidth(repeats: int = 5) -> Bandwidth:
    """Best-of-``repeats`` GB/s of two memory-bound jitted programs over 1 GiB float32."""

    def gbps(function: Callable, *arrays: jax.Array) -> float:
        compiled = jax.jit(function)
        compiled(*arrays).block_until_ready()
        seconds, _ = best_time(lambda: compiled(*arrays).block_until_ready(), repeats)
        return sum(a.nbytes for a in arrays) / seconds / 1e9

    vector = jnp.ones((GIB // 4,), jnp.float32)
    sum_gbps = gbps(jnp.sum, vector)
    del vector
    side = 1 << 14  # 16384 x 16384 float32 = 1 GiB
    matrix, x = jnp.ones((side, side), jnp.float32), jnp.ones((side,), jnp.float32)
    matvec_gbps = gbps(jnp.matmul, matrix, x)
    del matrix, x
    return Bandwidth(sum_gbps, matvec_gbps)


def weight_bytes_per_step(model: Any) -> int:
    """Bytes of weights one decode step reads: every parameter once (a tied embedding
    and lm_head counted once), from the torch module's shapes and dtypes."""
    module = model.torch_module
    return sum(t.nbytes for t in [*module.parameters(), *module.buffers()])


GenerateFn = Callable[[np.ndarray, np.ndarray, int], np.ndarray]


@dataclasses.dataclass
class Implementation:
    """A way to generate: ``generate(ids, mask, n)`` makes exactly ``n`` new greedy
    tokens; ``compile_count()`` counts the executables compiled so far."""

    name: str
    generate: GenerateFn
    compile_count: Callable[[], int] = lambda: 0


def measure_prefill(impl: Implementation, tokenizer: Any, length: int, batch: int, repeats: int) -> Prefill:
    """Prompt tokens/s of a generation with one new token (after a warm-up call)."""
    ids, mask = make_prompts(tokenizer, batch, length)
    impl.generate(ids, mask, 1)
    compiled = impl.compile_count()
    seconds, _ = best_time(lambda: impl.generate(ids, mask, 1), repeats)
    return Prefill(batch, seconds, batch * length / seconds, impl.compile_count() - compiled)


def measure_decode(
    impl: Implementation, tokenizer: Any, plan: DecodePlan, batch: int, repeats: int
) -> tuple[Decode, np.ndarray]:
    """Decode tokens/s from two generation lengths (after a warm-up call of each);
    also returns the new tokens of the longer run."""
    ids, mask = make_prompts(tokenizer, batch, plan.prompt_tokens)
    impl.generate(ids, mask, plan.short)
    impl.generate(ids, mask, plan.long)
    compiled = impl.compile_count()
    short_s, _ = best_time(lambda: impl.generate(ids, mask, plan.short), repeats)
    long_s, out = best_time(lambda: impl.generate(ids, mask, plan.long), repeats)
    rate = batch * (plan.long - plan.short) / (long_s - short_s)
    result = Decode(batch, short_s, long_s, rate, impl.compile_count() - compiled)
    return result, np.asarray(out)[:, ids.shape[1] :]


def run_comparison(
    impls: Sequence[Implementation], tokenizer: Any, args: argparse.Namespace, plan: DecodePlan
) -> dict[str, BackendResults]:
    """All prefill and decode measurements, the implementations one after the other for
    each row, so that the machine's load changes affect the rows more than the ratios."""
    results = {impl.name: BackendResults([], [], []) for impl in impls}
    for batch in args.prefill_batches:
        for impl in impls:
            log(f"[{impl.name}] prefill, batch {batch}, {args.prefill_tokens} tokens")
            results[impl.name].prefill.append(
                measure_prefill(impl, tokenizer, args.prefill_tokens, batch, args.repeats)
            )
    for batch in args.batches:
        for impl in impls:
            log(f"[{impl.name}] decode, batch {batch}, {plan.short} and {plan.long} new tokens")
            result, tokens = measure_decode(impl, tokenizer, plan, batch, args.repeats)
            results[impl.name].decode.append(result)
            if batch == 1:
                results[impl.name].batch1_tokens = tokens[0].tolist()
    return results


def ttpu_implementation(model: Any) -> Implementation:
    """Greedy generation of exactly ``n`` new tokens with ttpu (named after its backend)."""

    def generate(ids: np.ndarray, mask: np.ndarray, n: int) -> np.ndarray:
        return model.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False)

    return Implementation(model.backend, generate, lambda: model.compile_count)


def eager_implementation(module: Any) -> Implementation:
    """Greedy generation of exactly ``n`` new tokens with transformers in eager PyTorch."""

    def generate(ids: np.ndarray, mask: np.ndarray, n: int) -> np.ndarray:
        with torch.no_grad():
            out = module.generate(
                torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                max_new_tokens=n, min_new_tokens=n, do_sample=False,
            )
        return out.numpy()

    return Implementation("eager", generate)


def load_ttpu(model: str, backend: str) -> Any:
    """The benchmarked model, compiled by ttpu on ``backend``."""
    return AutoModelForTPU.from_pretrained(model, backend=backend)


def compile_probe(args: argparse.Namespace) -> CompileProbe:
    """In this (fresh) process: load the model, time the first batch-1 generate call
    (tracing + compiling, or reading the persistent cache, + running), then the same
    call again (best of ``--repeats``)."""
    start = time.perf_counter()
    model = load_ttpu(args.model, args.backend)
    load_s = time.perf_counter() - start
    plan = plan_decode(args.new_tokens)
    ids, mask = make_prompts(model.tokenizer, 1, plan.prompt_tokens)
    generate = ttpu_implementation(model).generate
    first_s, _ = best_time(lambda: generate(ids, mask, plan.long), 1)
    steady_s, _ = best_time(lambda: generate(ids, mask, plan.long), args.repeats)
    return CompileProbe(load_s, first_s, steady_s, model.compile_count)


def run_compile_probe(args: argparse.Namespace, backend: str, cache: Path) -> CompileProbe:
    """Run :func:`compile_probe` for ``backend`` in a new Python process using the compile
    and program caches under ``cache`` (each process has its own random ``PYTHONHASHSEED``, as users' do)."""
    command = [
        sys.executable, os.path.abspath(__file__), "--compile-probe", "--model", args.model,
        "--backend", backend, "--new-tokens", str(args.new_tokens), "--repeats", str(args.repeats),
    ]
    # Traced programs are kept beside the compiled ones: cold means both empty.
    env = {**os.environ, COMPILE_CACHE_ENV: str(cache), PROGRAM_CACHE_ENV: str(cache / "programs")}
    files_before = _file_count(cache)
    done = subprocess.run(command, check=False, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"compile probe failed ({done.returncode}):\n{done.stderr[-4000:]}")
    probe = CompileProbe(**json.loads(done.stdout.strip().splitlines()[-1]))
    probe.cache_files_added = _file_count(cache) - files_before
    return probe


def _file_count(directory: Path) -> int:
    return sum(1 for path in directory.rglob("*") if path.is_file())


# ----------------------------------------------------------------------------- report


def leading_matches(a: Sequence[int], b: Sequence[int]) -> int:
    """How many tokens two sequences share before they first differ."""
    count = 0
    for x, y in zip(a, b):
        if x != y:
            break
        count += 1
    return count


def roofline_tokens_per_s(r: dict[str, Any]) -> float:
    """Batch-1 decode tokens/s if every step only streamed the weights at full bandwidth."""
    return r["bandwidth"].best_gbps * 1e9 / r["bytes_per_step"]


def _header(r: dict[str, Any]) -> list[str]:
    other = r["other_cpu_s"]
    load = (
        "other processes' CPU use unknown (no /proc/stat)" if other is None else
        f"other processes used {other:.0f} CPU-seconds during the run ({other / r['total_s']:.2f} of "
        f"{r['cpu_count']} cores on average); every row slows when they compete"
    )
    return [
        f"ttpu generate benchmark: {r['model']} ({r['model_class']}, {r['dtype']}), backends {', '.join(r['backends'])}",
        f"command: {r['command']}",
        (f"device:  {r['devices']}, {r['cpu_count']} CPU cores; torch {torch.__version__}, "
         f"{r['torch_threads']} threads; eager attention: {r['eager_attention']}"),
        f"load:    {load}",
    ]


def _batch1(r: dict[str, Any], name: str) -> Decode | None:
    return next((d for d in r["results"][name].decode if d.batch == 1), None)


def _bandwidth_section(r: dict[str, Any]) -> list[str]:
    bw: Bandwidth = r["bandwidth"]
    roofline = roofline_tokens_per_s(r)
    lines = [
        "memory bandwidth (best of 5 calls, measured before and after the generation timings)",
        f"  jitted jnp.sum over 1 GiB float32          {bw.sum_gbps:8.1f} GB/s",
        f"  jitted matvec, 1 GiB float32 matrix        {bw.matvec_gbps:8.1f} GB/s",
        f"  bandwidth (max of the two)                 {bw.best_gbps:8.1f} GB/s",
        "",
        "batch-1 decode roofline",
        (f"  weights read per decode step               {r['bytes_per_step'] / 1e6:8.1f} MB "
         f"({r['param_arrays']} arrays, a tied embedding/lm_head counted once)"),
        f"  roofline = bandwidth / bytes per step      {roofline:8.1f} tok/s",
    ]
    for name in r["backends"]:
        if batch1 := _batch1(r, name):
            lines.append(f"  {name + ' batch-1 decode':<43}{batch1.tokens_per_s:8.1f} tok/s "
                         f"= {100 * batch1.tokens_per_s / roofline:.0f}% of roofline")
    return lines


def _compile_section(r: dict[str, Any]) -> list[str]:
    plan: DecodePlan = r["plan"]
    lines = [
        (f"compile: first generate() in a fresh process (batch 1, {plan.prompt_tokens}-token prompt, "
         f"{plan.long} new tokens)"),
        "  (first - steady ~ trace + compile, or trace + cache read)",
        "  backend    compile cache       load model   first call   steady call   first - steady   "
        "executables   cache files added",
    ]
    for name in r["backends"]:
        cold, warm = r["compile"][name]
        for label, probe in (("cold (empty dir)", cold), ("warm (persistent)", warm)):
            lines.append(f"  {name:<11}{label:<18}{probe.load_s:10.1f} s{probe.first_call_s:11.2f} s"
                         f"{probe.steady_s:12.2f} s{probe.first_call_s - probe.steady_s:15.2f} s"
                         f"{probe.executables:14d}{probe.cache_files_added:20d}")
    return lines


def _prefill_section(r: dict[str, Any]) -> list[str]:
    lines = [
        f"prefill: {r['prefill_tokens']}-token prompts, max_new_tokens=1, best of {r['repeats']}",
        "  batch   backend      ttpu s   ttpu tok/s     eager s   eager tok/s   ttpu/eager",
    ]
    eager = r["results"]["eager"].prefill
    for name in r["backends"]:
        for t, e in zip(r["results"][name].prefill, eager):
            lines.append(f"  {t.batch:5d}   {name:<10}{t.seconds:9.3f}{t.tokens_per_s:13.1f}{e.seconds:12.3f}"
                         f"{e.tokens_per_s:14.1f}{t.tokens_per_s / e.tokens_per_s:12.2f}x")
    return lines


def _decode_section(r: dict[str, Any]) -> list[str]:
    plan: DecodePlan = r["plan"]
    short, long = plan.short, plan.long
    lines = [
        (f"decode: {plan.prompt_tokens}-token prompts (bucket {plan.prompt_bucket}, KV cache "
         f"{plan.cache_length}); tok/s = batch * ({long} - {short}) / (t{long} - t{short}), "
         f"best of {r['repeats']}"),
        (f"  batch   backend    ttpu t{short:<3d}  ttpu t{long:<3d}  ttpu tok/s   eager t{short:<3d}  "
         f"eager t{long:<3d}  eager tok/s   ttpu/eager"),
    ]
    eager = r["results"]["eager"].decode
    for name in r["backends"]:
        for t, e in zip(r["results"][name].decode, eager):
            lines.append(f"  {t.batch:5d}   {name:<9}{t.short_s:6.2f} s{t.long_s:9.2f} s{t.tokens_per_s:12.1f}"
                         f"{e.short_s:10.2f} s{e.long_s:10.2f} s{e.tokens_per_s:13.1f}"
                         f"{t.tokens_per_s / e.tokens_per_s:12.2f}x")
    return lines


def _summary_section(r: dict[str, Any]) -> list[str]:
    eager: BackendResults = r["results"]["eager"]
    eager_batch1 = next((d for d in eager.decode if d.batch == 1), None)
    lines = ["summary"]
    for name in r["backends"]:
        ttpu: BackendResults = r["results"][name]
        batch1 = _batch1(r, name)
        if batch1 and eager_batch1:
            top_t, top_e = ttpu.decode[-1], eager.decode[-1]
            scaling = f"batch-{top_t.batch} / batch-1 decode throughput"
            matches = leading_matches(ttpu.batch1_tokens, eager.batch1_tokens)
            lines += [
                f"  [{name}]",
                f"  batch-1 decode vs roofline                 {100 * batch1.tokens_per_s / roofline_tokens_per_s(r):8.0f} %",
                f"  batch-1 decode ttpu / eager                {batch1.tokens_per_s / eager_batch1.tokens_per_s:8.2f}x",
                (f"  {scaling:<43}{top_t.tokens_per_s / batch1.tokens_per_s:8.2f}x ttpu, "
                 f"{top_e.tokens_per_s / eager_batch1.tokens_per_s:.2f}x eager"),
                f"  batch-1 greedy tokens equal to eager       {matches:5d} / {len(ttpu.batch1_tokens)} (leading)",
            ]
        recompiles = sum(m.recompiles for m in [*ttpu.prefill, *ttpu.decode])
        lines.append(f"  executables compiled while timing          {recompiles:5d} (after the warm-ups; expected 0)")
    lines.append(f"  total benchmark time                       {r['total_s']:8.0f} s")
    return lines


def format_report(r: dict[str, Any]) -> str:
    """The results table as text."""
    sections = [
        _header(r),
        _bandwidth_section(r),
        _compile_section(r),
        _prefill_section(r),
        _decode_section(r),
        _summary_section(r),
    ]
    return "\n\n".join("\n".join(lines) for lines in sections)


def to_json(results: dict[str, Any]) -> dict[str, Any]:
    """The results as plain JSON-able values."""
    def plain(value: Any) -> Any:
        if dataclasses.is_dataclass(value):
            return {k: plain(v) for k, v in dataclasses.asdict(value).items()}
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value

    out = {k: plain(v) for k, v in results.items()}
    out["bandwidth"]["best_gbps"] = results["bandwidth"].best_gbps
    out["roofline_tokens_per_s"] = roofline_tokens_per_s(results)
    return out


# ----------------------------------------------------------------------------- main


def benchmark(args: argparse.Namespace, cache: Path) -> dict[str, Any]:
    """Run every measurement; ``cache`` is the (initially empty) compile cache directory."""
    started, cpu_at_start = time.perf_counter(), cpu_seconds()
    plan = plan_decode(args.new_tokens)
    compile_probes = {}
    for backend in args.backends:
        log(f"[{backend}] compile, cold cache: fresh process, cache {cache}")
        cold = run_compile_probe(args, backend, cache)
        log(f"[{backend}] compile, warm cache: fresh process, same cache")
        compile_probes[backend] = (cold, run_compile_probe(args, backend, cache))

    os.environ[COMPILE_CACHE_ENV] = str(cache)  # read by the first from_pretrained below
    log(f"loading {args.model} with ttpu ({', '.join(args.backends)}) and with transformers (eager PyTorch)")
    models = [load_ttpu(args.model, backend) for backend in args.backends]
    model = models[0]
    transformers.logging.set_verbosity_error()
    module = transformers.AutoModelForCausalLM.from_pretrained(resolve(args.model), dtype=model.dtype).eval()
    log("measuring memory bandwidth")
    before = measure_bandwidth()
    impls = [*map(ttpu_implementation, models), eager_implementation(module)]
    compared = run_comparison(impls, model.tokenizer, args, plan)
    log("measuring memory bandwidth again")
    after = measure_bandwidth()
    return {
        "model": args.model,
        "model_class": type(model.torch_module).__name__,
        "dtype": str(model.dtype).removeprefix("torch."),
        "backends": args.backends,
        "command": shlex.join([os.path.basename(sys.executable), *sys.argv]),
        "devices": f"jax {jax.__version__} {jax.devices()}",
        "cpu_count": os.cpu_count(),
        "other_cpu_s": other_cpu_seconds(cpu_at_start, cpu_seconds()),
        "torch_threads": torch.get_num_threads(),
        "eager_attention": module.config._attn_implementation,
        "prefill_tokens": args.prefill_tokens,
        "repeats": args.repeats,
        "plan": plan,
        "bandwidth": Bandwidth(max(before.sum_gbps, after.sum_gbps), max(before.matvec_gbps, after.matvec_gbps)),
        "bytes_per_step": weight_bytes_per_step(model),
        "param_arrays": len(model.params),
        "compile": compile_probes,
        "results": compared,
        "total_s": time.perf_counter() - started,
    }


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    if args.compile_probe:
        print(json.dumps(dataclasses.asdict(compile_probe(args))))
        return
    with tempfile.TemporaryDirectory(prefix="ttpu-bench-xla-") as cache:
        results = benchmark(args, Path(cache))
    print(format_report(results))
    if args.json:
        args.json.write_text(json.dumps(to_json(results), indent=2))


if __name__ == "__main__":
    main()
