#!/usr/bin/env bash
# The oldest transformers release pyproject claims, in its own environment (.venv-oldest):
# a smoke subset of the suite (loading, the compiled forward, generation, the program store, and the
# patch registry, whose older patches only the oldest release still applies);
# arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
oldest="$(grep -o '"transformers>=[0-9.]*' pyproject.toml | cut -d'=' -f2)"
env_dir=.venv-oldest
if ! "$env_dir/bin/python" -c "import transformers, sys; sys.exit(transformers.__version__ != '$oldest')" 2>/dev/null; then
  rm -rf "$env_dir"
  python3 -m venv "$env_dir"
  "$env_dir/bin/pip" install --quiet --disable-pip-version-check torch==2.13.0
fi
"$env_dir/bin/pip" install --quiet --disable-pip-version-check -e '.[jax,test]' "transformers==$oldest"
"$env_dir/bin/python" -m pytest -q "$@" tests/test_model.py tests/test_generation.py tests/test_program_store.py tests/test_package.py tests/test_patches.py
