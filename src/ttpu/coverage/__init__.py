"""The coverage sweep (``ttpu coverage``): every model type of the installed
transformers, built from a tiny random config, run eagerly and under ttpu, compared.

A tool beside the library, split by concern: ``configs`` (tiny configs, the class to
build), ``inputs`` (generic forward inputs), ``run`` (one model type end to end),
``classify`` (failure causes), ``sweep`` (worker subprocesses with timeouts),
``report`` (markdown and JSON) and ``cli`` (the command). Usage::

    ttpu coverage                                   # full sweep -> ./ttpu-coverage.md
    ttpu coverage --filter '^(llama|gpt2|bert)$' --out-md docs/COVERAGE.md
"""

from ttpu.coverage.classify import classify, classify_generate
from ttpu.coverage.cli import main, run_coverage
from ttpu.coverage.configs import tiny_config
from ttpu.coverage.report import summarize, write_json, write_markdown
from ttpu.coverage.run import run_one
from ttpu.coverage.sweep import select_model_types, sweep

__all__ = [
    "classify", "classify_generate", "main", "run_coverage", "run_one", "select_model_types", "summarize",
    "sweep", "tiny_config", "write_json", "write_markdown",
]
