"""jax's persistent compilation cache, on by default under the ttpu cache directory."""

from __future__ import annotations

from pathlib import Path

import jax

from ttpu.paths import compile_cache_dir

# Compilations faster than this are cheaper to redo than to read back.
MIN_COMPILE_SECONDS = 0.5


def enable_persistent_cache() -> Path | None:
    """Point jax's persistent compilation cache at ttpu's directory (idempotent)."""
    directory = compile_cache_dir()
    if directory is None:
        return None
    directory.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(directory))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_SECONDS)
    return directory
