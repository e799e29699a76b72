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
                     "aten._grouped_mm", "compiles:    yes",
                     "generate:    compiled decode loop; cache: 2 full attention layers",
                     "paged:       yes (the serving engine and generate run the paged step)"):
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


def test_generate_prints_the_prompt_and_its_continuation(model_dir, capsys) -> None:
    from ttpu import AutoModelForTPU

    assert main(["generate", "the quick brown", "--model", model_dir, "--max-new-tokens", "5"]) == 0
    printed = capsys.readouterr().out.strip()
    model = AutoModelForTPU.from_pretrained(model_dir)
    expected = "the quick brown" + "".join(model.stream("the quick brown", max_new_tokens=5))
    assert printed == expected.strip()


def test_generate_rejects_bad_sampling_options(model_dir, capsys) -> None:
    argv = ["generate", "the quick", "--model", model_dir, "--do-sample", "--top-p", "1.5"]
    assert main(argv) == 2
    assert "top_p must be in (0, 1]" in capsys.readouterr().err


CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }} {% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


def test_chat_answers_each_turn(model_dir, tmp_path, monkeypatch, capsys) -> None:
    from test_loading import tiny_llama
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.chat_template = CHAT_TEMPLATE
    tiny_llama().save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    monkeypatch.setattr("sys.stdin", __import__("io").StringIO("the quick\nbrown fox\n"))
    assert main(["chat", "--model", str(tmp_path), "--max-new-tokens", "3"]) == 0
    assert capsys.readouterr().out.count("> ") == 3  # two turns answered, then the end


def test_chat_without_a_template_is_a_clear_error(model_dir, monkeypatch, capsys) -> None:
    monkeypatch.setattr("sys.stdin", __import__("io").StringIO("hello\n"))
    assert main(["chat", "--model", model_dir]) == 2
    assert "no chat template" in capsys.readouterr().err


def test_unknown_chat_roles_are_refused() -> None:
    from ttpu.errors import InvalidArgumentError
    from ttpu.generation.chat import chat_prompt

    class Templated:
        chat_template = CHAT_TEMPLATE

    with pytest.raises(InvalidArgumentError, match="chat roles are"):
        chat_prompt(Templated(), [{"role": "wizard", "content": "hi"}])


def test_doctor_with_parallelism_reports_the_mesh(model_dir, capsys) -> None:
    assert main(["doctor", model_dir, "--parallelism", "fsdp"]) == 0
    out = capsys.readouterr().out
    assert "sharding:    fsdp {fsdp: 8} (parallelism='fsdp' requested)" in out
    assert "compiles:    yes" in out


def test_generate_prints_no_deprecation_noise(model_dir) -> None:
    """transformers' renamed keywords (5.24: ``cache``) are followed: a fresh process's
    ``ttpu generate`` writes no deprecation warning, with Python's warnings all shown."""
    import os
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-W", "always", "-m", "ttpu.cli", "generate", "the quick", "--model", model_dir,
         "--max-new-tokens", "4"],
        capture_output=True, text=True, env={**os.environ, "TTPU_PROGRAM_CACHE": "off"},
    )
    assert done.returncode == 0, done.stderr
    noise = [line for line in done.stderr.splitlines() if "deprecat" in line.lower() or "Warning" in line]
    assert not noise, noise


def test_train_fine_tunes_on_a_text_file_and_resumes(model_dir, tmp_path, capsys) -> None:
    import json

    from transformers import AutoModelForCausalLM

    text = tmp_path / "corpus.jsonl"
    text.write_text("\n".join(json.dumps({"text": "the quick brown fox jumps over a lazy dog " * 3}) for _ in range(12)))
    out = tmp_path / "out"
    command = ["train", model_dir, "--data", str(text), "--output-dir", str(out), "--block-size", "16",
               "--batch-size", "2", "--max-steps", "4", "--logging-steps", "2", "--save-steps", "2",
               "--learning-rate", "1e-2"]
    assert main(command) == 0
    captured = capsys.readouterr()
    assert "trained 4 steps" in captured.out
    assert "train_tokens_per_second" in captured.out + captured.err  # throughput as it goes
    assert AutoModelForCausalLM.from_pretrained(out) is not None
    assert main([*command[:-6], "--max-steps", "6", "--logging-steps", "2", "--save-steps", "2", "--resume"]) == 0
    assert "trained 6 steps" in capsys.readouterr().out


def test_train_reports_a_bad_jsonl_field(model_dir, tmp_path, capsys) -> None:
    data = tmp_path / "data.jsonl"
    data.write_text('{"content": "hello"}\n')
    assert main(["train", model_dir, "--data", str(data), "--output-dir", str(tmp_path / "o")]) == 2
    assert "has no 'text' field" in capsys.readouterr().err


def test_doctor_lists_what_was_quantized(model_dir, capsys) -> None:
    assert main(["doctor", "--quantization", "int8", model_dir]) == 0
    out = capsys.readouterr().out
    assert "quantized:   int8: 16 modules" in out and "  - lm_head: int8 per channel" in out
    assert main(["doctor", "--quantization", "int3", model_dir]) == 2
    assert "valid: int8, int4" in capsys.readouterr().err
