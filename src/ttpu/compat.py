"""Names that differ between the transformers releases ttpu supports (pyproject's range).

transformers 5.24 renamed the cache argument of every forward and the cache field of
every output from ``past_key_values`` (``cache_params`` for state-space models) to
``cache``; the old names still work there but warn on each call.
"""

from __future__ import annotations

import transformers
from packaging.version import Version

TRANSFORMERS_VERSION = Version(transformers.__version__)
RENAMED_CACHE = Version("5.24.0")

# The forward's keyword for a cache, and the output field holding the cache.
CACHE_KEYWORD = "cache" if TRANSFORMERS_VERSION >= RENAMED_CACHE else "past_key_values"
CACHE_OUTPUT = CACHE_KEYWORD

# Cache layers that hold nothing (shared-KV or attention-free layers): transformers >= 5.23.
try:
    from transformers.cache_utils import DummyLayer
except ImportError:  # older caches have no such layers
    DummyLayer = None
