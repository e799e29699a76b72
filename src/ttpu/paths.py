"""ttpu's cache directory (converted models, compiled executables)."""

from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV = "TTPU_CACHE_DIR"


def cache_dir() -> Path:
    """``$TTPU_CACHE_DIR``, else ``$XDG_CACHE_HOME/ttpu``, else ``~/.cache/ttpu``."""
    if explicit := os.environ.get(CACHE_ENV):
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "ttpu"


COMPILE_CACHE_ENV = "TTPU_COMPILE_CACHE"
_OFF = ("0", "off", "false", "none")


def compile_cache_dir() -> Path | None:
    """Where backends persist compiled executables; None when TTPU_COMPILE_CACHE=off."""
    setting = os.environ.get(COMPILE_CACHE_ENV)
    if setting is not None and setting.lower() in _OFF:
        return None
    return Path(setting) if setting else cache_dir() / "xla"


PROGRAM_CACHE_ENV = "TTPU_PROGRAM_CACHE"


def program_cache_dir() -> Path | None:
    """Where traced programs are kept for later processes (``jax.export``); None when
    TTPU_PROGRAM_CACHE=off."""
    setting = os.environ.get(PROGRAM_CACHE_ENV)
    if setting is not None and setting.lower() in _OFF:
        return None
    return Path(setting) if setting else cache_dir() / "programs"
