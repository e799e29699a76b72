"""The ttpu command line on a tiny model saved to a local directory."""

from __future__ import annotations

import pytest

from test_loading import tiny_llama, tiny_tokenizer
from ttpu.cli import main


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-llama")
    tiny_llama().save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return str(path)


def test_doctor_reports_how_the_model_runs(model_dir, capsys) -> None:
    assert main(["doctor", model_dir]) == 0
    out = capsys.readouterr().out
    for expected in ("backend:     jax on cpu", "LlamaForCausalLM", "task:        causal-lm",
                     "dtype:       float32", "attention:   ttpu", "patches:     0 applied",
                     "aten._grouped_mm", "compiles:    yes"):
        assert expected in out


def test_predict_prints_the_most_likely_next_tokens(model_dir, capsys) -> None:
    assert main(["predict", "the quick brown", "--model", model_dir, "--top", "3"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "prompt: 'the quick brown'" and len(lines) == 4


def test_empty_prompt_is_a_clear_error(model_dir, capsys) -> None:
    assert main(["predict", "  ", "--model", model_dir]) == 2
    assert "the prompt is empty" in capsys.readouterr().err


def test_bad_option_values_are_reported_not_raised(model_dir, capsys) -> None:
    assert main(["doctor", model_dir, "--dtype", "int3"]) == 2
    assert "valid dtypes" in capsys.readouterr().err


def test_unknown_options_are_rejected() -> None:
    with pytest.raises(SystemExit):
        main(["predict", "hi", "--bogus"])
