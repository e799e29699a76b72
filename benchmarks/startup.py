"""Start-up benchmark: fresh processes from launch to the first and the last new token.

Three kinds of fresh process generate the same greedy continuation (``--new-tokens``,
64 by default, EOS ignored) of one prompt with the same model, streaming it:

* **ttpu cold**: empty compile and program caches (private temporary directories), so
  the process traces and compiles everything;
* **ttpu warm**: the caches the cold process just filled, so it reads the traced
  programs back (``jax.export``) and the compiled executables (jax's persistent cache);
* **transformers eager**: the same converted model directory, plain transformers
  ``generate`` with a streamer.

For each, the wall time from just before the process is launched to its first and to
its last new token. The ttpu processes then stream the same prompt once more: the
first call against this steady-state call is the warm start's overhead. The model
directory is converted beforehand (it is the model, not a cache). Each round runs the
three processes one after the other (the machine's load drifts); the table shows the
best of ``--rounds`` rounds.

Usage::

    python benchmarks/startup.py [--model gemma-3-270m] [--new-tokens 64] [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from ttpu.paths import COMPILE_CACHE_ENV, PROGRAM_CACHE_ENV

PROMPT = "The secret to baking a good cake is"


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def run_ttpu(model: str, new_tokens: int) -> dict[str, Any]:
    """In a fresh process: load, stream, then stream again (steady state)."""
    from ttpu import AutoModelForTPU

    events: dict[str, Any] = {"imported": time.time()}
    tpu = AutoModelForTPU.from_pretrained(model)
    events["loaded"] = time.time()
    settings = {"max_new_tokens": new_tokens, "min_new_tokens": new_tokens, "do_sample": False}
    ids = tpu.tokenizer(PROMPT, return_tensors="np")["input_ids"]
    start = time.time()
    tokens = []
    for piece in _token_stream(tpu, ids, settings):
        tokens.append(piece)
        if len(tokens) == 1:
            events["first"] = time.time()
    events["last"] = time.time()
    events["first_call"] = events["last"] - start
    start = time.time()
    again = list(_token_stream(tpu, ids, settings))
    events["steady_call"] = time.time() - start
    events["tokens"] = tokens
    events["same_again"] = again == tokens
    events["traces"] = tpu.trace_count
    return events


def _token_stream(tpu: Any, ids: Any, settings: dict[str, Any]):
    """Each new token id as soon as the host has it (ttpu's stream, by token ids)."""
    from ttpu.generation.generate import stream_tokens

    yield from stream_tokens(tpu, ids, **settings)


def run_eager(model: str, new_tokens: int) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.generation.streamers import BaseStreamer

    events: dict[str, Any] = {"imported": time.time()}
    module = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(model)
    events["loaded"] = time.time()
    tokens: list[int] = []

    class Timestamps(BaseStreamer):
        prompt_seen = False

        def put(self, value: torch.Tensor) -> None:
            if not self.prompt_seen:  # generate() passes the prompt first
                self.prompt_seen = True
                return
            tokens.extend(int(t) for t in value.reshape(-1))
            if "first" not in events:
                events["first"] = time.time()

        def end(self) -> None:
            events["last"] = time.time()

    ids = tokenizer(PROMPT, return_tensors="pt")
    with torch.no_grad():
        module.generate(
            **ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, streamer=Timestamps()
        )
    events["tokens"] = tokens
    return events


def launch(kind: str, model: str, new_tokens: int, env: dict[str, str]) -> dict[str, Any]:
    """Run one fresh process of ``kind``; event times relative to its launch."""
    command = [sys.executable, __file__, "--child", kind, "--model", model, "--new-tokens", str(new_tokens)]
    launched = time.time()
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{kind} process failed:\n{done.stderr[-4000:]}")
    events = json.loads(done.stdout.strip().splitlines()[-1])
    log(f"  {kind}: " + ", ".join(f"{k}={v}" for k, v in events.items() if k != "tokens"))
    for name in ("imported", "loaded", "first", "last"):
        events[name] -= launched
    return events


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="gemma-3-270m")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--child", choices=("ttpu", "eager"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        run = run_ttpu if args.child == "ttpu" else run_eager
        print(json.dumps(run(args.model, args.new_tokens)))
        return

    from ttpu.models import resolve

    log(f"resolving {args.model} (converted into the ttpu cache on first use)")
    directory = resolve(args.model)
    rows: dict[str, list[dict[str, Any]]] = {"ttpu cold": [], "ttpu warm": [], "transformers eager": []}
    with tempfile.TemporaryDirectory(prefix="ttpu-startup-") as scratch:
        for round_index in range(args.rounds):
            caches = Path(scratch) / f"round{round_index}"
            env = {
                **os.environ,
                COMPILE_CACHE_ENV: str(caches / "xla"),
                PROGRAM_CACHE_ENV: str(caches / "programs"),
            }
            for kind, child, model in (
                ("transformers eager", "eager", directory),
                ("ttpu cold", "ttpu", args.model),
                ("ttpu warm", "ttpu", args.model),
            ):
                log(f"round {round_index + 1}/{args.rounds}: {kind}")
                rows[kind].append(launch(child, model, args.new_tokens, env))
    print(report(rows, args))


def report(rows: dict[str, list[dict[str, Any]]], args: argparse.Namespace) -> str:
    best = {kind: min(runs, key=lambda e: e["last"]) for kind, runs in rows.items()}
    eager = best["transformers eager"]
    lines = [
        f"# ttpu start-up: {args.model}, {args.new_tokens} new tokens, best of {args.rounds} rounds",
        "",
        "| process | imports (s) | loaded (s) | first token (s) | last token (s) | vs eager | traces | tokens = eager |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for kind, e in best.items():
        traces = e.get("traces", "-")
        lines.append(
            f"| {kind} | {e['imported']:.1f} | {e['loaded']:.1f} | {e['first']:.1f} | {e['last']:.1f} "
            f"| {e['last'] / eager['last']:.2f}x | {traces} | {e['tokens'] == eager['tokens']} |"
        )
    warm = best["ttpu warm"]
    ratio = warm["first_call"] / warm["steady_call"]
    lines += [
        "",
        f"ttpu warm: first call {warm['first_call']:.2f} s, steady-state call {warm['steady_call']:.2f} s "
        f"({ratio:.2f}x; target <= 1.2x)",
        f"ttpu warm to the last token: {warm['last']:.1f} s vs transformers eager {eager['last']:.1f} s "
        f"({warm['last'] / eager['last']:.2f}x; target <= 1.0x)",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
