"""jax's persistent compilation cache, on by default under the ttpu cache directory."""

from __future__ import annotations

import os
from pathlib import Path

import jax

from ttpu.paths import cache_dir

COMPILE_CACHE_ENV = "TTPU_COMPILE_CACHE"
# Compilations faster than this are cheaper to redo than to read back.
MIN_COMPILE_SECONDS = 0.5


def compile_cache_dir() -> Path | None:
    """Where compiled executables persist; None when TTPU_COMPILE_CACHE=off."""
    setting = os.environ.get(COMPILE_CACHE_ENV)
    if setting is not None and setting.lower() in ("0", "off", "false", "none"):
        return None
    return Path(setting) if setting else cache_dir() / "xla"


def enable_persistent_cache() -> Path | None:
    """Point jax's persistent compilation cache at ttpu's directory (idempotent)."""
    directory = compile_cache_dir()
    if directory is None:
        return None
    directory.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(directory))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_SECONDS)
    return directory
