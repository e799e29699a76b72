"""Package-level guarantees: lazy imports, the persistent compile cache."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path


def run_python(code: str, **env: str) -> str:
    import os

    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True, text=True, env={**os.environ, **env}, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_import_ttpu_loads_no_backend() -> None:
    out = run_python(
        """
        import sys, ttpu
        heavy = [m for m in ("jax", "torchax", "torch", "transformers") if m in sys.modules]
        print(heavy)
        """
    )
    assert out.strip() == "[]"


def test_commands_import_only_what_they_use() -> None:
    out = run_python(
        """
        import sys
        from ttpu import cli
        import ttpu.coverage, ttpu.launch, ttpu.logs, ttpu.paths
        cli.build_parser().parse_args(["launch", "--nproc", "2", "script.py"])
        heavy = [m for m in ("jax", "torchax", "torch", "transformers") if m in sys.modules]
        print(heavy)
        """
    )
    assert out.strip() == "[]"


def test_compiled_executables_persist_in_the_configured_directory(tmp_path: Path) -> None:
    cache = tmp_path / "xla"
    out = run_python(
        """
        import jax, numpy as np, torch
        from transformers import LlamaConfig, LlamaForCausalLM
        from ttpu import AutoModelForTPU
        from ttpu.backends.jax import compile_cache
        config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32,
                             num_hidden_layers=1, num_attention_heads=2)
        model = AutoModelForTPU.from_model(LlamaForCausalLM(config))
        print(jax.config.jax_compilation_cache_dir)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)  # tiny model
        model(input_ids=np.ones((1, 4), np.int64))
        """,
        TTPU_COMPILE_CACHE=str(cache),
    )
    assert out.strip().splitlines()[-1] == str(cache)
    assert any(cache.iterdir()), "no executable was written to the persistent cache"


def test_compile_cache_can_be_turned_off() -> None:
    out = run_python(
        """
        from ttpu.backends.jax import compile_cache
        print(compile_cache.enable_persistent_cache())
        """,
        TTPU_COMPILE_CACHE="off",
    )
    assert out.strip() == "None"
