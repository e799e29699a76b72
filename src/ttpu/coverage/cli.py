"""``ttpu coverage``: select model types, sweep them, write the reports."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ttpu.coverage.report import summarize, write_json, write_markdown
from ttpu.coverage.run import run_one
from ttpu.coverage.sweep import DEFAULT_TIMEOUT, select_model_types, sweep, worker_env

# Reports go to the current directory unless --out-md / --out-json say where.
DEFAULT_OUT_MD = "ttpu-coverage.md"
DEFAULT_OUT_JSON = "ttpu-coverage.json"


def run_coverage(
    model_types: str | Sequence[str] | None = None,
    workers: int = 2,
    timeout: float = DEFAULT_TIMEOUT,
    out_md: str | Path | None = DEFAULT_OUT_MD,
    out_json: str | Path | None = DEFAULT_OUT_JSON,
    *,
    sample: int | None = None,
    resume: bool = False,
    progress: bool = True,
    command: str | None = None,
) -> dict[str, Any]:
    """Sweep model types (all, a regex, or a list); write the markdown and JSON reports.

    ``resume`` reuses results already in ``out_json`` and sweeps only the rest.
    Returns the summary (headline percentage, counts, failure causes).
    """
    types = select_model_types(model_types, sample)
    command = command or "python -m ttpu.coverage " + " ".join(sys.argv[1:])
    previous: dict[str, dict] = {}
    if resume and out_json and Path(out_json).exists():
        for r in json.loads(Path(out_json).read_text()).get("results", []):
            r.pop("cause", None)
            previous[r["model_type"]] = r
    todo = [t for t in types if t not in previous]
    done = [previous[t] for t in types if t in previous]
    start = time.time()

    def checkpoint(result: dict[str, Any]) -> None:
        done.append(result)
        if out_json and len(done) % 10 == 0:
            write_json(done, out_json, command)

    sweep(todo, workers=workers, timeout=timeout, progress=progress, on_result=checkpoint)
    order = {t: i for i, t in enumerate(types)}
    done.sort(key=lambda r: order[r["model_type"]])
    elapsed = time.time() - start
    if out_json:
        write_json(done, out_json, command)
    if out_md:
        write_markdown(done, out_md, command, elapsed)
    return summarize(done)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="ttpu coverage",
        description="Run every transformers model type (tiny random weights) through ttpu.",
    )
    parser.add_argument("--filter", help="regex on model_type (e.g. '^(llama|bert)$')")
    parser.add_argument("--types", help="comma-separated model types")
    parser.add_argument("--sample", type=int, help="sweep a random sample of this many types")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT, help="seconds per model type")
    parser.add_argument("--out-md", default=DEFAULT_OUT_MD)
    parser.add_argument("--out-json", default=DEFAULT_OUT_JSON)
    parser.add_argument("--resume", action="store_true", help="reuse results already in --out-json")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--eager-only", action="store_true", help="skip ttpu (debug tiny configs)")
    parser.add_argument("--one", help="run a single model type in this process and print the result")
    args = parser.parse_args(argv)
    if args.eager_only:
        os.environ["TTPU_COVERAGE_EAGER_ONLY"] = "1"
    if args.one:
        worker_env()
        print(json.dumps({**run_one(args.one)}, indent=1, default=str))
        return 0
    selection: str | list[str] | None = args.filter
    if args.types:
        selection = [t.strip() for t in args.types.split(",") if t.strip()]
    command = "ttpu coverage " + " ".join(argv if argv is not None else sys.argv[1:])
    summary = run_coverage(
        selection, workers=args.workers, timeout=args.timeout, out_md=args.out_md,
        out_json=args.out_json, sample=args.sample, resume=args.resume,
        progress=not args.no_progress, command=command.strip(),
    )
    print(f"{summary['matches']}/{summary['eager']} match ({summary['headline']:.1f}%)")
    for cause, count in summary["causes"].items():
        print(f"{count:5d}  {cause}")
    return 0


