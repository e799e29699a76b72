#!/usr/bin/env bash
# Every test: the main suite in .venv (JAX backend, the newest transformers), a smoke subset
# on the oldest transformers pyproject claims, then the torch_xla backend's tests in their
# own environment on PJRT CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
# Two pytest workers, each taking whole files (a file's model fixtures load once): most of
# the suite's time is single-threaded tracing and compiling, so two cores run it ~1.5x faster.
# A worker that dies (its test fails) is replaced at most twice.
workers=(-n 2 --dist loadfile --max-worker-restart 2)
bash scripts/install.sh
.venv/bin/python -m pytest "${workers[@]}"
# The oldest transformers pyproject claims (the newest is what pip resolved above).
bash scripts/test-oldest-transformers.sh "${workers[@]}"
torch_xla_env="$(bash scripts/install-torch-xla.sh)"
PJRT_DEVICE=CPU "$torch_xla_env/bin/python" -m pytest "${workers[@]}" tests/torch_xla_backend --ignore tests/torch_xla_backend/test_spmd.py
# SPMD mode is process-wide and CPU devices are counted when the runtime starts: own process.
PJRT_DEVICE=CPU CPU_NUM_DEVICES=8 "$torch_xla_env/bin/python" -m pytest tests/torch_xla_backend/test_spmd.py
