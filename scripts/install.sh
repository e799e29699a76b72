#!/usr/bin/env bash
# Create .venv (if missing) and install ttpu with the JAX backend, offline models and tests.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
# torch first, pinned to the CPU build (other versions pull several GB of CUDA packages).
.venv/bin/pip install --quiet --disable-pip-version-check torch==2.13.0
.venv/bin/pip install --quiet --disable-pip-version-check -e '.[jax,offline,serve,train,test]'
