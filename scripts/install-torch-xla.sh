#!/usr/bin/env bash
# The torch_xla backend's environment, apart from .venv: torch_xla 2.9.0 loads only with
# torch 2.9.0 (the CUDA build on PyPI, ~4 GB), while .venv has the CPU torch 2.13.
# Built once into the ttpu cache and reused; prints its path.
set -euo pipefail
cd "$(dirname "$0")/.."
env_dir="${TTPU_TORCH_XLA_ENV:-${TTPU_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/ttpu}/envs/torch-xla-2.9.0}"
pip_install() { "$env_dir/bin/pip" install --quiet --disable-pip-version-check "$@" >&2; }
if ! "$env_dir/bin/python" -c "import torch_xla" 2>/dev/null; then
  rm -rf "$env_dir"
  python3 -m venv "$env_dir"
  pip_install torch==2.9.0 'torch-xla[pallas]==2.9.0'
fi
# This checkout's ttpu (the cached environment outlives clones); the JAX backend and the
# offline models too, for the tests comparing the two backends and the real-weight checks.
pip_install -e '.[torch-xla,jax,offline,train,test]'
echo "$env_dir"
