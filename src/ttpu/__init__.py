"""ttpu: run Hugging Face transformers models compiled on XLA accelerators (TPU, GPU, CPU).

Public API (imported lazily so that ``import ttpu`` loads no backend)::

    from ttpu import AutoModelForTPU
    model = AutoModelForTPU.from_pretrained("gemma-3-270m")

    from ttpu import LLM, SamplingParams        # the serving engine (continuous batching)
    llm = LLM("gemma-3-270m", max_num_seqs=32)

    from ttpu import Trainer, TrainingArguments  # training with transformers' semantics
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ttpu import logs  # noqa: F401  (the ttpu logger's stderr handler)

__version__ = "0.1.0"

_LAZY = {
    "AutoModelForTPU": "ttpu.auto",
    "TPUModel": "ttpu.model",
    "BucketPolicy": "ttpu.buckets",
    "describe_sharding": "ttpu.sharding",
    "fsdp_v2": "ttpu.backends.torch_xla.fsdp",
    "LLM": "ttpu.serving.llm",
    "SamplingParams": "ttpu.serving.request",
    "QuantizationConfig": "ttpu.quantization",
    "Trainer": "ttpu.training.trainer",
    "TrainingArguments": "ttpu.training.arguments",
}

__all__ = ["__version__", *_LAZY]

if TYPE_CHECKING:
    from ttpu.auto import AutoModelForTPU
    from ttpu.backends.torch_xla.fsdp import fsdp_v2
    from ttpu.buckets import BucketPolicy
    from ttpu.model import TPUModel
    from ttpu.quantization import QuantizationConfig
    from ttpu.serving.llm import LLM
    from ttpu.serving.request import SamplingParams
    from ttpu.sharding import describe_sharding
    from ttpu.training.arguments import TrainingArguments
    from ttpu.training.trainer import Trainer


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'ttpu' has no attribute {name!r}")
