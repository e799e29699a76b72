"""The coverage sweep's building blocks: tiny configs, one model end to end, the report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ttpu import coverage

RECORDED = Path(__file__).parent.parent / "docs" / "coverage.json"
SAMPLE_SIZE = 10
SAMPLE_MAX_SECONDS = 20  # a quick sample: the recorded sweep's times, eager and ttpu together


def test_tiny_config_shrinks_a_model_generically() -> None:
    config = coverage.tiny_config("llama")
    assert config.hidden_size <= 64 and config.num_hidden_layers <= 2
    assert config.hidden_size % config.num_attention_heads == 0


def test_one_model_type_runs_eager_and_matches_under_ttpu() -> None:
    result = coverage.run_one("bert")
    assert result["eager"] and result["compiles"] and result["matches"], result
    assert result["rel_err"] <= 1e-5


def test_report_has_the_headline_table_and_causes(tmp_path) -> None:
    results = [
        {"model_type": "good", "class": "GoodModel", "eager": True, "compiles": True,
         "matches": True, "rel_err": 1e-7},
        {"model_type": "bad", "class": "BadModel", "eager": True, "compiles": False,
         "matches": False, "stage": "ttpu",
         "error": {"type": "OperatorNotFound",
                   "message": "Operator with name aten::foo has no lowering"}},
        {"model_type": "broken", "class": "BrokenModel", "eager": False, "stage": "eager",
         "error": {"type": "RuntimeError", "message": "shape mismatch"}},
    ]
    summary = coverage.summarize(results)
    assert (summary["eager"], summary["matches"], summary["headline"]) == (2, 1, 50.0)
    path = tmp_path / "COVERAGE.md"
    coverage.write_markdown(results, path, command="ttpu coverage")
    text = path.read_text()
    assert "1 / 2 = 50.0%" in text and "aten::foo" in text and "| bad |" in text


def test_report_has_the_generate_column_and_its_causes(tmp_path) -> None:
    ok = {"eager": True, "matches": True, "stage": ""}
    results = [
        {"model_type": "good", "eager": True, "matches": True, "generate": ok, "serve": ok},
        {"model_type": "nocache", "eager": True, "matches": True, "generate": {
            "eager": True, "matches": False, "stage": "ttpu",
            "error": {"type": "InvalidArgumentError",
                      "message": "generate() needs a model that returns a transformers Cache; ..."}}},
        {"model_type": "differs", "eager": True, "matches": True,
         "generate": {"eager": True, "matches": False, "stage": "compare"},
         "serve": {"eager": True, "matches": False, "stage": "ttpu", "error": {
             "type": "RuntimeError", "message": "aten::foo has no lowering"}}},
        {"model_type": "lengthy", "eager": True, "matches": True, "generate": ok, "serve": {
            **ok, "recomputes": "XForCausalLM fails one request per row (the model reads its cache's length (for "
                                "positions or masks), and the paged cache's requests each have their own)"}},
        {"model_type": "broken", "eager": True, "matches": True,
         "generate": {"eager": False, "matches": False, "stage": "eager"}},
        {"model_type": "encoder", "eager": True, "matches": True},
    ]
    summary = coverage.summarize(results)
    assert (summary["generate_eager"], summary["generate_matches"]) == (4, 2)
    assert summary["generate_causes"] == {
        "forward returns no Cache": 1, "different tokens": 1, "eager generate failed": 1,
    }
    path = tmp_path / "COVERAGE.md"
    coverage.write_markdown(results, path, command="ttpu coverage")
    text = path.read_text()
    assert "generate: 2 / 4 = 50.0%" in text
    assert "| nocache | " in text and "no (forward returns no Cache)" in text
    assert "| encoder |" in text and "| - |" in text
    assert (summary["serve_eager"], summary["serve_matches"], summary["serve_of_generating"]) == (3, 2, 2)
    assert summary["serve_causes"] == {"op without lowering: aten::foo": 1}
    assert summary["serve_recomputed"] == 1
    assert summary["serve_recomputed_causes"] == {"the model reads its cache's length": 1}
    assert "serve: 2 / 3 = 66.7%" in text and "2 of the 2 whose static `generate` matches; 1 of the served" in text
    assert "| the model reads its cache's length | 1 | lengthy |" in text and "yes (recomputes)" in text


@pytest.mark.slow
def test_a_sample_of_the_sweep_does_not_regress() -> None:
    """A fixed sample of the model types that matched eager in the recorded sweep
    (docs/coverage.json) still match; a type missing from the installed transformers
    (an older release), or one whose recorded run took over ``SAMPLE_MAX_SECONDS`` (a few
    keep their real widths, such as sam3_tracker's 41M parameters at 1008x1008 pixels:
    the whole sweep runs those), is left out of the sample."""
    import random

    recorded = {r["model_type"]: r for r in json.loads(RECORDED.read_text())["results"]}
    installed = set(coverage.select_model_types(None))
    matched = sorted(t for t, r in recorded.items() if r.get("matches") and t in installed
                     and r["times"]["total"] <= SAMPLE_MAX_SECONDS)
    sample = sorted(random.Random(0).sample(matched, SAMPLE_SIZE))
    results = coverage.sweep(sample, workers=2, progress=False)
    regressed = {r["model_type"]: coverage.classify(r) for r in results if not r.get("matches")}
    assert not regressed, f"matched in {RECORDED.name}, no longer: {regressed}"
