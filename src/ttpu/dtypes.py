"""dtype policy: "auto" is float32 on CPU and bfloat16 on TPU/GPU."""

from __future__ import annotations

from typing import Any

import torch

from ttpu.errors import InvalidArgumentError

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16"}
# XLA:CPU bf16 matrix-vector products were measured ~45x slower than float32.
AUTO_DTYPE_BY_PLATFORM = {"cpu": torch.float32, "gpu": torch.bfloat16, "tpu": torch.bfloat16}


def resolve_dtype(dtype: Any, platform: str) -> torch.dtype:
    """Turn "auto", a name, or a torch/numpy/jax dtype into a torch dtype."""
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    name = str(getattr(dtype, "name", dtype)).removeprefix("torch.").lower()
    if name == "auto":
        return AUTO_DTYPE_BY_PLATFORM.get(platform, torch.float32)
    name = _ALIASES.get(name, name)
    if name in DTYPES:
        return DTYPES[name]
    raise InvalidArgumentError(
        f"unsupported dtype {dtype!r}; valid dtypes: auto, {', '.join(DTYPES)}."
    )
