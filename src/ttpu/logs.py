"""The ``ttpu`` logger: every diagnostic of the library goes through it.

Modules log to ``logging.getLogger(__name__)`` (children of ``ttpu``). Unless the
application configures logging itself, ttpu's messages at INFO and above go to stderr
as ``ttpu: message``; ``TTPU_VERBOSITY`` (debug, info, warning, error) sets the level,
as ``TRANSFORMERS_VERBOSITY`` does for transformers. Progress bars are not logs: the
CLI draws its own.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterator

VERBOSITY_ENV = "TTPU_VERBOSITY"
LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}

logger = logging.getLogger("ttpu")


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time (redirected, or captured by a
    test runner), not the stream of import time."""

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def _configure() -> None:
    """A stderr handler on the ``ttpu`` logger, once (applications that attach their own
    handlers to it, or set it not to propagate, are left alone)."""
    if logger.handlers:
        return
    handler = _StderrHandler()
    handler.setFormatter(logging.Formatter("ttpu: %(message)s"))
    logger.addHandler(handler)
    logger.propagate = False
    level = LEVELS.get(os.environ.get(VERBOSITY_ENV, "info").lower(), logging.INFO)
    logger.setLevel(level)


_configure()


@contextlib.contextmanager
def transformers_progress_hidden() -> Iterator[None]:
    """transformers' own progress bars (loading weights, converting GGUF, writing
    shards) off while ttpu shows one display of its own; restored afterwards.

    transformers' GGUF conversion draws a plain ``tqdm`` bar that ignores its progress
    switch: that module's ``tqdm`` is replaced by a silent one for the duration."""
    import functools
    import sys

    from tqdm.auto import tqdm
    from transformers.utils import logging as transformers_logging

    was_enabled = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()
    gguf = sys.modules.get("transformers.modeling_gguf_pytorch_utils")
    with contextlib.ExitStack() as restore:
        if gguf is not None and hasattr(gguf, "tqdm"):
            restore.callback(setattr, gguf, "tqdm", gguf.tqdm)
            gguf.tqdm = functools.partial(tqdm, disable=True)
        try:
            yield
        finally:
            if was_enabled:
                transformers_logging.enable_progress_bar()


_progress_hidden = 0


def progress_enabled() -> bool:
    """Whether ttpu's own progress bars show (not while a caller draws its own display)."""
    return _progress_hidden == 0


@contextlib.contextmanager
def library_progress_hidden() -> Iterator[None]:
    """ttpu's and transformers' progress bars off, for a caller (the CLI) that shows one
    display of its own for the whole step."""
    global _progress_hidden
    _progress_hidden += 1
    try:
        with transformers_progress_hidden():
            yield
    finally:
        _progress_hidden -= 1
