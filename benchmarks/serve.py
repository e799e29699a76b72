"""Benchmark ttpu's serving engine against transformers' ways of serving many requests, in one run.

One workload (random prompt and output lengths, EOS ignored, every request arriving at
once; ``--poisson RATE`` adds a variant arriving as a Poisson process) runs through:

* ``ttpu engine``: :class:`ttpu.serving.engine.LLMEngine` (continuous batching, paged KV,
  chunked prefill), after its warm-up, with a seat per request unless ``--max-num-seqs``
  says otherwise (vLLM's default of 256 seats would seat them all too; its KV pool holds
  every seat at ``max_model_len``: 128 seats at 2048 tokens take about 10 GB for Gemma 3 270M);
* ``hf static bN``: transformers' ``generate`` on left-padded batches of N requests in
  arrival order, each batch running to its longest output (eager PyTorch; ``all``: one
  batch of every request);
* ``hf continuous``: transformers' own continuous batching (``init_continuous_batching``,
  each request with its own ``max_new_tokens``);
* ``ttpu static bN``: ttpu's compiled ``generate()`` on the same batches (after an
  untimed pass over them, so no compile is timed).

Columns (vLLM's definitions): output tok/s and total (prompt + output) tok/s over the wall
time from the first arrival to the last finish; TTFT (arrival to first token) and TPOT
((finish - first token) / (output tokens - 1)) at p50 and p99; padding efficiency (real
tokens / computed token slots, where it is known); compiles during the timed run; warm-up
seconds. HF static batches report streamed token times (a ``BaseStreamer``); ttpu's static
``generate()`` returns a batch's tokens together, so its TTFT is the batch's end and it has
no TPOT. The ratios of ttpu's engine to the others' output tok/s end the table.

Usage::

    python benchmarks/serve.py [--model gemma-3-270m] [--requests 48] [--prompt-len 32,256]
        [--output-len 16,96] [--static-batches 8,32,all] [--max-num-seqs N] [--poisson 2.0] [--json PATH]

The issue's workload is ``--requests 128 --prompt-len 32,512 --output-len 16,256``; the
defaults are smaller so that the eager baselines finish in minutes on two CPU cores.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig
from transformers.generation.streamers import BaseStreamer

from ttpu import models
from ttpu.serving.request import SamplingParams

# ttpu's model loading and engine import torchax, which claims torch's PrivateUse1 device;
# transformers' continuous batching then fails asking torch for the accelerator's module.
# They are imported after the transformers runs (see main).


def log(message: str) -> None:
    """Progress goes to stderr, so stdout holds only the table."""
    print(message, file=sys.stderr, flush=True)


def _pair(text: str) -> tuple[int, int]:
    low, high = (int(x) for x in text.split(","))
    return low, high


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="gemma-3-270m")
    parser.add_argument("--requests", type=int, default=48)
    parser.add_argument("--prompt-len", type=_pair, default=(32, 256), help="uniform range, inclusive: LOW,HIGH")
    parser.add_argument("--output-len", type=_pair, default=(16, 96), help="uniform range, inclusive: LOW,HIGH")
    parser.add_argument("--static-batches", default="8,32,all",
                        help="batch sizes of the static baselines ('all': every request in one batch)")
    parser.add_argument("--max-num-seqs", type=int, default=None,
                        help="the engine's seats (default: one per request, so all arriving at once run together)")
    parser.add_argument("--max-num-batched-tokens", type=int, default=256)
    parser.add_argument("--max-model-len", type=int, default=None,
                        help="the engine's max_model_len (default: the workload's longest request)")
    parser.add_argument("--poisson", type=float, default=None, help="also run arrivals at this rate (requests/s)")
    parser.add_argument("--skip", default="", help="comma-separated rows to leave out: hf-static,hf-continuous,ttpu-static")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None)
    return parser.parse_args(argv)


@dataclass(frozen=True)
class Workload:
    prompts: list[list[int]]
    output_lens: list[int]
    arrivals: list[float]  # seconds after the start

    @property
    def prompt_tokens(self) -> int:
        return sum(map(len, self.prompts))

    @property
    def output_tokens(self) -> int:
        return sum(self.output_lens)

    def at_once(self) -> Workload:
        return dataclasses.replace(self, arrivals=[0.0] * len(self.prompts))


def make_workload(tokenizer: Any, args: argparse.Namespace) -> Workload:
    """Prompts cut from local prose (transformers' long description) at random offsets."""
    import importlib.metadata

    text = importlib.metadata.metadata("transformers").get_payload()
    stream = tokenizer(text, add_special_tokens=False)["input_ids"]
    rng = np.random.default_rng(args.seed)
    lengths = rng.integers(args.prompt_len[0], args.prompt_len[1] + 1, args.requests)
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    prompts = []
    for n in lengths:
        start = int(rng.integers(0, len(stream) - n))
        prompts.append(bos + stream[start : start + int(n) - len(bos)])
    outputs = rng.integers(args.output_len[0], args.output_len[1] + 1, args.requests).tolist()
    gaps = rng.exponential(1.0 / args.poisson, args.requests) if args.poisson else np.zeros(args.requests)
    return Workload(prompts, [int(n) for n in outputs], np.cumsum(gaps).tolist())


@dataclass
class Result:
    name: str
    workload: str
    seconds: float
    prompt_tokens: int
    output_tokens: int
    ttft: list[float]
    tpot: list[float]
    padding_efficiency: float | None = None
    compiles: int | None = None
    warm_up_s: float | None = None

    def row(self) -> dict[str, Any]:
        def pct(values: list[float], q: float) -> float | None:
            return float(np.percentile(values, q)) * 1000 if values else None

        return {
            "name": self.name, "workload": self.workload, "seconds": self.seconds,
            "output_tok_s": self.output_tokens / self.seconds,
            "total_tok_s": (self.prompt_tokens + self.output_tokens) / self.seconds,
            "ttft_p50_ms": pct(self.ttft, 50), "ttft_p99_ms": pct(self.ttft, 99),
            "tpot_p50_ms": pct(self.tpot, 50), "tpot_p99_ms": pct(self.tpot, 99),
            "padding_efficiency": self.padding_efficiency, "compiles": self.compiles, "warm_up_s": self.warm_up_s,
        }


def _latencies(arrivals: Sequence[float], firsts: Sequence[float], finishes: Sequence[float],
               outputs: Sequence[int], streamed: bool = True) -> tuple[list[float], list[float]]:
    ttft = [f - a for a, f in zip(arrivals, firsts)]
    tpot = [(end - first) / (n - 1) for first, end, n in zip(firsts, finishes, outputs) if n > 1] if streamed else []
    return ttft, tpot


# ----------------------------------------------------------------------------- the four ways


def build_engine(model: Any, workload: Workload, args: argparse.Namespace) -> tuple[Any, float]:
    """The engine for ``workload``'s lengths, warmed up (every bucket compiled); the
    warm-up's seconds."""
    from ttpu.serving.engine import EngineConfig, LLMEngine

    max_len = args.max_model_len or max(len(p) + n for p, n in zip(workload.prompts, workload.output_lens))
    config = EngineConfig(max_num_seqs=args.max_num_seqs or len(workload.prompts), max_model_len=-(-max_len // 16) * 16,
                          max_num_batched_tokens=args.max_num_batched_tokens)
    engine = LLMEngine(model, config)
    log("ttpu engine: warm-up")
    return engine, engine.warm_up()


def run_engine(engine: Any, warm_up_s: float, workload: Workload, label: str) -> Result:
    log(f"ttpu engine ({label})")
    engine.kv.pool.forget_prefixes()  # no head start from an earlier run's identical prompts
    compiled, scheduled, padded = engine.compile_count, engine.scheduled_tokens, engine.padded_tokens
    requests, firsts, finishes = [], {}, {}
    pending = list(enumerate(zip(workload.prompts, workload.output_lens, workload.arrivals)))
    start = time.perf_counter()
    while pending or engine.has_unfinished_requests:
        now = time.perf_counter() - start
        while pending and pending[0][1][2] <= now:
            i, (prompt, n, _) = pending.pop(0)
            params = SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)
            requests.append(engine.add_request(f"{label}-{i}", prompt, params))
        if not engine.has_unfinished_requests:
            time.sleep(min(0.005, max(pending[0][1][2] - now, 0)))
            continue
        for request in engine.step():
            t = time.perf_counter() - start
            firsts.setdefault(request.id, t)
            if request.status.finished:
                finishes[request.id] = t
    seconds = max(finishes.values())
    order = [f"{label}-{i}" for i in range(len(workload.prompts))]
    ttft, tpot = _latencies(workload.arrivals, [firsts[i] for i in order], [finishes[i] for i in order],
                            workload.output_lens)
    assert [len(r.output_token_ids) for r in requests] == workload.output_lens  # added in index order
    efficiency = (engine.scheduled_tokens - scheduled) / (engine.padded_tokens - padded)
    return Result("ttpu engine", label, seconds, workload.prompt_tokens, workload.output_tokens, ttft, tpot,
                  efficiency, engine.compile_count - compiled, warm_up_s)


class _TokenTimes(BaseStreamer):
    """The time of each ``put`` (the prompt first, then one per generated token)."""

    def __init__(self, start: float) -> None:
        self.start, self.times = start, []

    def put(self, value: Any) -> None:
        self.times.append(time.perf_counter() - self.start)

    def end(self) -> None:
        pass


def _batches(workload: Workload, size: int) -> list[list[int]]:
    indices = list(range(len(workload.prompts)))
    return [indices[i : i + size] for i in range(0, len(indices), size)]


def _left_padded(prompts: list[list[int]], pad: int) -> tuple[np.ndarray, np.ndarray]:
    width = max(map(len, prompts))
    ids = np.full((len(prompts), width), pad, np.int64)
    mask = np.zeros_like(ids)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt) :], mask[row, width - len(prompt) :] = prompt, 1
    return ids, mask


def _static(name: str, workload: Workload, size: int, pad: int,
            generate: Callable[[np.ndarray, np.ndarray, int, float], list[float] | None]) -> Result:
    """Batches of ``size`` in arrival order; ``generate(ids, mask, n, start)`` makes ``n``
    new tokens and returns the token times (None when it does not stream)."""
    firsts, finishes, slots, real = {}, {}, 0, 0
    start = time.perf_counter()
    for batch in _batches(workload, size):
        ids, mask = _left_padded([workload.prompts[i] for i in batch], pad)
        longest = max(workload.output_lens[i] for i in batch)
        times = generate(ids, mask, longest, start)
        end = time.perf_counter() - start
        for i in batch:
            n = workload.output_lens[i]
            firsts[i], finishes[i] = (times[1], times[n]) if times else (end, end)
        slots += ids.size + len(batch) * longest
        real += int(mask.sum()) + sum(workload.output_lens[i] for i in batch)
    order = range(len(workload.prompts))
    ttft, tpot = _latencies(workload.arrivals, [firsts[i] for i in order], [finishes[i] for i in order],
                            workload.output_lens, streamed=times is not None)
    return Result(name, "at once", max(finishes.values()), workload.prompt_tokens, workload.output_tokens, ttft, tpot,
                  real / slots)


def run_hf_static(module: Any, workload: Workload, size: int, pad: int) -> Result:
    log(f"hf static b{size}")

    def generate(ids: np.ndarray, mask: np.ndarray, n: int, start: float) -> list[float]:
        streamer = _TokenTimes(start)
        with torch.no_grad():
            module.generate(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask), max_new_tokens=n,
                            min_new_tokens=n, do_sample=False, pad_token_id=pad, streamer=streamer)
        return streamer.times

    return _static(f"hf static b{size}", workload, size, pad, generate)


def run_ttpu_static(model: Any, workload: Workload, size: int, pad: int) -> Result:
    def generate(ids: np.ndarray, mask: np.ndarray, n: int, start: float) -> None:
        model.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False)
        return None

    log(f"ttpu static b{size}: untimed pass (compiles)")
    _static("", workload, size, pad, generate)
    compiled = model.compile_count
    log(f"ttpu static b{size}")
    result = _static(f"ttpu static b{size}", workload, size, pad, generate)
    result.compiles = model.compile_count - compiled
    return result


def run_hf_continuous(module: Any, workload: Workload, label: str) -> Result:
    log(f"hf continuous ({label})")
    config = GenerationConfig(do_sample=False, max_new_tokens=max(workload.output_lens), eos_token_id=-1)
    manager = module.init_continuous_batching(generation_config=config)
    manager.start()
    results: dict[str, Any] = {}
    start = time.perf_counter()

    def feed() -> None:
        for i, (prompt, n, arrival) in enumerate(zip(workload.prompts, workload.output_lens, workload.arrivals)):
            time.sleep(max(0.0, arrival - (time.perf_counter() - start)))
            manager.add_request(prompt, request_id=str(i), max_new_tokens=n, record_timestamps=True, eos_token_id=-1)

    feeder = threading.Thread(target=feed)
    feeder.start()
    try:
        while len(results) < len(workload.prompts):
            result = manager.get_result(timeout=1)
            if result is not None and result.is_finished():
                if result.error:
                    raise RuntimeError(f"transformers' continuous batching failed: {result.error}")
                results[result.request_id] = result
            elif result is None and not manager.is_running():
                raise RuntimeError("transformers' continuous batching stopped")
    finally:
        feeder.join()
        manager.stop(block=True)
    order = [results[str(i)] for i in range(len(workload.prompts))]
    assert [len(r.generated_tokens) for r in order] == workload.output_lens
    firsts = [r.timestamps[0] - start for r in order]
    finishes = [r.timestamps[-1] - start for r in order]
    ttft, tpot = _latencies(workload.arrivals, firsts, finishes, workload.output_lens)
    return Result("hf continuous", label, max(finishes), workload.prompt_tokens, workload.output_tokens, ttft, tpot)


# ----------------------------------------------------------------------------- the table


def _cell(value: Any, digits: int = 1) -> str:
    if value is None:
        return "—"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def table(rows: list[dict[str, Any]]) -> str:
    columns = [("name", "way"), ("workload", "arrivals"), ("output_tok_s", "output tok/s"),
               ("total_tok_s", "total tok/s"), ("ttft_p50_ms", "TTFT p50 ms"), ("ttft_p99_ms", "TTFT p99 ms"),
               ("tpot_p50_ms", "TPOT p50 ms"), ("tpot_p99_ms", "TPOT p99 ms"),
               ("padding_efficiency", "padding eff."), ("compiles", "compiles"), ("warm_up_s", "warm-up s")]
    lines = ["| " + " | ".join(title for _, title in columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = [_cell(row[key], 2 if key == "padding_efficiency" else 1) for key, _ in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def ratios(rows: list[dict[str, Any]]) -> list[str]:
    """ttpu engine's output tok/s over each other way's, on the same arrivals."""
    lines = []
    for engine in (r for r in rows if r["name"] == "ttpu engine"):
        for other in rows:
            if other["name"] != "ttpu engine" and other["workload"] == engine["workload"]:
                ratio = engine["output_tok_s"] / other["output_tok_s"]
                lines.append(f"ttpu engine / {other['name']} ({engine['workload']}): {ratio:.2f}x output tok/s")
    return lines


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    skip = set(filter(None, args.skip.split(",")))
    directory = models.resolve(args.model)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    workload = make_workload(tokenizer, args)
    at_once = workload.at_once()
    log(f"{args.requests} requests: {at_once.prompt_tokens} prompt tokens, {at_once.output_tokens} output tokens")
    sizes = list(dict.fromkeys(min(args.requests, args.requests if s == "all" else int(s))
                               for s in args.static_batches.split(",") if s))  # b32 of 8 requests is b8
    poisson = f"poisson {args.poisson}/s"
    module = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    hf = []
    if "hf-continuous" not in skip:
        hf.append(run_hf_continuous(module, at_once, "at once"))
        if args.poisson:
            hf.append(run_hf_continuous(module, workload, poisson))
    if "hf-static" not in skip:
        hf += [run_hf_static(module, at_once, size, pad) for size in sizes]
    del module
    from ttpu import AutoModelForTPU

    model = AutoModelForTPU.from_pretrained(args.model)
    engine, warm_up_s = build_engine(model, at_once, args)
    results = [run_engine(engine, warm_up_s, at_once, "at once")]
    if args.poisson:
        results.append(run_engine(engine, warm_up_s, workload, poisson))
    del engine
    results += hf
    if "ttpu-static" not in skip:
        results += [run_ttpu_static(model, at_once, size, pad) for size in sizes]
    rows = [r.row() for r in results]
    print(f"{args.model}: {args.requests} requests, prompts {args.prompt_len[0]}-{args.prompt_len[1]} tokens, "
          f"outputs {args.output_len[0]}-{args.output_len[1]} tokens (EOS ignored), "
          f"{at_once.prompt_tokens} + {at_once.output_tokens} tokens; torch threads {torch.get_num_threads()}")
    print(table(rows))
    print("\n".join(ratios(rows)))
    if args.json:
        with open(args.json, "w") as f:
            used = {"max_num_seqs": args.max_num_seqs or args.requests, "static_batches": sizes}
            json.dump({"args": {**vars(args), **used}, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
