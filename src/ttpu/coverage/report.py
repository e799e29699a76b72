"""The sweep's markdown and JSON reports and their summary."""

from __future__ import annotations

import datetime
import json
import math
import os
import platform
from collections import Counter
from pathlib import Path
from typing import Any

from ttpu.coverage.classify import classify, classify_generate, classify_recompute
from ttpu.coverage.run import GENERATE_TOKENS, RTOL


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    import ttpu

    out = {"python": platform.python_version(), "ttpu": ttpu.__version__ + _revision()}
    for name in ("transformers", "torch", "jax", "jaxlib", "torchax"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = "not installed"
    return out


def _revision() -> str:
    """" (git abc1234)" for a source checkout, or $TTPU_COVERAGE_REVISION."""
    rev = os.environ.get("TTPU_COVERAGE_REVISION")
    if not rev:
        import subprocess

        try:
            rev = subprocess.run(
                ["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).parent,
                capture_output=True, text=True, timeout=10, check=True,
            ).stdout.strip()
        except Exception:  # noqa: BLE001
            rev = ""
    return f" (git {rev})" if rev else ""


def _fmt_err(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return f"{value:.1e}"


DECODING_COLUMNS = ("generate", "serve")  # the greedy-token checks of causal LMs


def _mark(value: Any) -> str:
    return {True: "yes", False: "no", None: "?"}.get(value, str(value))


def summarize(results: list[dict[str, Any]]) -> dict[str, Any]:
    eager = [r for r in results if r.get("eager")]
    matches = [r for r in eager if r.get("matches")]
    compiles = [r for r in eager if r.get("compiles")]
    causes = Counter(classify(r) for r in results if classify(r))
    summary = {
        "model_types": len(results),
        "eager": len(eager),
        "compiles": len(compiles),
        "matches": len(matches),
        "headline": (100.0 * len(matches) / len(eager)) if eager else 0.0,
        "causes": dict(causes.most_common()),
    }
    for column in DECODING_COLUMNS:
        checked = [r[column] for r in results if r.get(column)]
        ran = [c for c in checked if c.get("eager")]
        matched = [c for c in ran if c.get("matches")]
        summary.update({
            f"{column}_checked": len(checked),
            f"{column}_eager": len(ran),
            f"{column}_matches": len(matched),
            f"{column}_headline": (100.0 * len(matched) / len(ran)) if ran else 0.0,
            f"{column}_causes": dict(Counter(classify_generate(c) for c in checked if classify_generate(c)).most_common()),
        })
    generating = [r for r in results if (r.get("generate") or {}).get("matches")]
    recomputed = [r["serve"]["recomputes"] for r in results if (r.get("serve") or {}).get("matches")
                  and r["serve"].get("recomputes")]
    summary["serve_recomputed"] = len(recomputed)
    summary["serve_recomputed_causes"] = dict(Counter(map(classify_recompute, recomputed)).most_common())
    summary["serve_of_generating"] = sum(bool((r.get("serve") or {}).get("matches")) for r in generating)
    summary["generating"] = len(generating)
    return summary


def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def write_markdown(results: list[dict[str, Any]], path: str | Path, command: str,
                   elapsed: float | None = None) -> None:
    summary = summarize(results)
    versions = _versions()
    lines = [
        "# ttpu model coverage",
        "",
        f"**{summary['matches']} / {summary['eager']} = {summary['headline']:.1f}%** of the model "
        "types whose eager torch forward runs also match under ttpu "
        f"(relative error <= {RTOL:g} on the main output, non-padded positions).",
        "",
        f"**generate: {summary['generate_matches']} / {summary['generate_eager']} = "
        f"{summary['generate_headline']:.1f}%** of the causal LMs whose transformers `generate` runs "
        f"give the same greedy tokens under ttpu ({GENERATE_TOKENS} new tokens, the same left-padded batch).",
        "",
        f"**serve: {summary['serve_matches']} / {summary['serve_eager']} = {summary['serve_headline']:.1f}%** "
        "of the same causal LMs give transformers' greedy tokens through the serving engine (each row's "
        "prompt unpadded, submitted together, against transformers' `generate` on that prompt alone, up to "
        f"its first EOS); {summary['serve_of_generating']} of the "
        f"{summary['generating']} whose static `generate` matches; {summary['serve_recomputed']} of the "
        "served recompute each sequence at every step, their cache or attention beyond the paged KV pool "
        "(see below). The engine applies the generation config's forced, suppressed and banned tokens, "
        "as transformers' `generate` does.",
        "",
        f"- date: {datetime.date.today().isoformat()}",
        "- versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()),
        f"- command: `{command}`",
        f"- model types swept: {summary['model_types']}; eager runs: {summary['eager']}; "
        f"ttpu compiles: {summary['compiles']}; matches: {summary['matches']}"
        + (f"; sweep time: {elapsed / 60:.0f} min" if elapsed else ""),
        "",
        "Models are random-weight tiny configs derived generically from each config class's "
        "defaults (`ttpu.coverage.tiny_config`), built with `torch.manual_seed(0)` in float32 "
        "eval mode; text inputs are a batch of 2 x 24 tokens with 6 padded positions in one row "
        "(left padding for causal LMs, right padding otherwise), compared with `use_cache=False`. "
        "\"text-only (multimodal)\" means a multimodal model run on its text inputs alone.",
        "",
        "## Failure causes",
        "",
        "| cause | count | examples |",
        "|---|---:|---|",
    ]
    by_cause: dict[str, list[str]] = {}
    for r in results:
        c = classify(r)
        if c:
            by_cause.setdefault(c, []).append(r["model_type"])
    for cause, count in summary["causes"].items():
        examples = ", ".join(by_cause[cause][:4])
        lines.append(f"| {_cell(cause)} | {count} | {_cell(examples)} |")
    for column in DECODING_COLUMNS:
        column_by_cause: dict[str, list[str]] = {}
        for r in results:
            c = classify_generate(r.get(column))
            if c:
                column_by_cause.setdefault(c, []).append(r["model_type"])
        lines += ["", f"## {column} failure causes", "", "| cause | count | model types |", "|---|---:|---|"]
        for cause, count in summary[f"{column}_causes"].items():
            lines.append(f"| {_cell(cause)} | {count} | {_cell(', '.join(column_by_cause[cause]))} |")
    recompute_by_cause: dict[str, list[str]] = {}
    for r in results:
        serve = r.get("serve") or {}
        if serve.get("matches") and serve.get("recomputes"):
            recompute_by_cause.setdefault(classify_recompute(serve["recomputes"]), []).append(r["model_type"])
    lines += ["", "## served by recomputing: why the paged cache cannot hold them", "",
              "| cause | count | model types |", "|---|---:|---|"]
    for cause, count in summary["serve_recomputed_causes"].items():
        lines.append(f"| {_cell(cause)} | {count} | {_cell(', '.join(recompute_by_cause[cause]))} |")
    lines += [
        "",
        "## Results",
        "",
        "| model_type | class | inputs | eager | compiles | matches | rel err | generate | serve | cause |",
        "|---|---|---|---|---|---|---:|---|---|---|",
    ]
    for r in results:
        cause = classify(r)
        error = r.get("error") or {}
        if cause and error.get("message") and not r.get("not_attempted"):
            cause = f"{cause} — {error.get('type', '')}: {error['message'][:120]}"
            if error.get("failing_line"):
                cause += f" (at {error['failing_line'].split(': ', 1)[0]})"
        lines.append(
            f"| {r['model_type']} | {r.get('class', '')} | {r.get('inputs', '')} | "
            f"{_mark(r.get('eager'))} | {_mark(r.get('compiles'))} | {_mark(r.get('matches'))} | "
            f"{_fmt_err(r.get('rel_err'))} | {_decoding_cell(r.get('generate'))} | {_decoding_cell(r.get('serve'))} | "
            f"{_cell(cause)} |"
        )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")


def _decoding_cell(check: dict[str, Any] | None) -> str:
    """yes / no (cause) / "-" when not a causal LM or not checked."""
    if not check:
        return "-"
    if check.get("matches"):
        return "yes (recomputes)" if check.get("recomputes") else "yes"
    return _cell(f"no ({classify_generate(check)})")


def write_json(results: list[dict[str, Any]], path: str | Path, command: str = "") -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "versions": _versions(),
        "command": command,
        "rtol": RTOL,
        "summary": summarize(results),
        "results": [{**r, "cause": classify(r), "generate_cause": classify_generate(r.get("generate")),
                     "serve_cause": classify_generate(r.get("serve"))} for r in results],
    }
    path.write_text(json.dumps(payload, indent=1, default=str))


