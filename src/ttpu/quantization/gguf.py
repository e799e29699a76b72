"""GGUF blocks kept as they are.

The GGUF block formats that map exactly onto ttpu's representation are decoded straight
into its integer values and scales, never through float:

| GGUF | ttpu | value |
|---|---|---|
| Q8_0 | int8, groups of 32 | ``q * d`` |
| Q5_0 | int8, groups of 32 | ``(q - 16) * d`` |
| Q6_K | int8, groups of 16 | ``(q - 32) * d * scale_j`` |
| Q4_0 | int8 (or int4), groups of 32 | ``(q - 8) * d`` |
| Q4_1 | int4, groups of 32 | ``q * d + m`` |
| Q4_K | int4, groups of 32 | ``q * d * scale_j - dmin * min_j`` |

Each kept tensor is checked to dequantize to exactly the weight transformers loaded
(which it dequantized from the same file), so a tensor the loader transforms (Llama's
query/key permutation, ...) is never kept by mistake.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from ttpu.quantization.tensors import dequantize, pack_int4

Decoded = tuple[np.ndarray, np.ndarray, np.ndarray | None]  # values, scales, minimums: per block
FLOAT_TYPES = ("F32", "F16", "BF16", "F64")
CHECK_ROWS = 4096  # rows dequantized at a time when checking a kept tensor


def _f16(column: np.ndarray) -> np.ndarray:
    """``[blocks, 2]`` bytes as float16 values, widened to float32 ``[blocks, 1]``."""
    return np.ascontiguousarray(column).view(np.float16).astype(np.float32)


def _nibbles(packed: np.ndarray, width: int = 16) -> np.ndarray:
    """``[blocks, bytes]`` of ggml's 4-bit layout as ``[blocks, 2 bytes]`` values: each
    run of ``width`` bytes holds ``width`` values in its low nibbles, then the next
    ``width`` in its high nibbles."""
    chunks = packed.reshape(packed.shape[0], -1, 1, width)
    values = (chunks >> np.array([0, 4], np.uint8).reshape(1, 1, 2, 1)) & np.uint8(0x0F)
    return values.reshape(packed.shape[0], -1)


def _q8_0(blocks: np.ndarray) -> Decoded:
    return np.ascontiguousarray(blocks[:, 2:]).view(np.int8), _f16(blocks[:, :2]), None


def _q5_0(blocks: np.ndarray) -> Decoded:
    high = np.ascontiguousarray(blocks[:, 2:6]).view(np.uint32) >> np.arange(32, dtype=np.uint32)
    values = _nibbles(blocks[:, 6:]) | ((high & 1).astype(np.uint8) << 4)
    return values.astype(np.int8) - np.int8(16), _f16(blocks[:, :2]), None


def _q4_0_int8(blocks: np.ndarray) -> Decoded:
    return _nibbles(blocks[:, 2:]).astype(np.int8) - np.int8(8), _f16(blocks[:, :2]), None


def _q4_0_int4(blocks: np.ndarray) -> Decoded:
    scale = _f16(blocks[:, :2])
    return _nibbles(blocks[:, 2:]), scale, -8 * scale


def _q4_1(blocks: np.ndarray) -> Decoded:
    return _nibbles(blocks[:, 4:]), _f16(blocks[:, :2]), _f16(blocks[:, 2:4])


def _q4_k(blocks: np.ndarray) -> Decoded:
    from gguf.quants import Q4_K

    sub_scales, sub_minimums = Q4_K.get_scale_min(np.ascontiguousarray(blocks[:, 4:16]))
    scale = _f16(blocks[:, :2]) * sub_scales.astype(np.float32)
    minimum = -(_f16(blocks[:, 2:4]) * sub_minimums.astype(np.float32))
    return _nibbles(blocks[:, 16:], 32), scale, minimum


def _q6_k(blocks: np.ndarray) -> Decoded:
    count = blocks.shape[0]
    low = blocks[:, :128].reshape(count, 2, 1, 64) >> np.array([0, 4], np.uint8).reshape(1, 1, 2, 1)
    low = (low & np.uint8(0x0F)).reshape(count, 2, 4, 32)
    high = blocks[:, 128:192].reshape(count, 2, 1, 32) >> np.array([0, 2, 4, 6], np.uint8).reshape(1, 1, 4, 1)
    high = (high & np.uint8(0x03)).reshape(count, 2, 4, 32)
    values = (low | (high << 4)).astype(np.int8).reshape(count, 256) - np.int8(32)
    scale = _f16(blocks[:, 208:210]) * np.ascontiguousarray(blocks[:, 192:208]).view(np.int8).astype(np.float32)
    return values, scale, None


class Format(NamedTuple):
    """How one GGUF block format is kept: its decoder, the values per scale, the bits."""

    decode: Callable[[np.ndarray], Decoded]
    group: int
    bits: str


# scheme -> GGUF type -> how it is kept
DECODERS: dict[str, dict[str, Format]] = {
    "int8": {"Q8_0": Format(_q8_0, 32, "int8"), "Q6_K": Format(_q6_k, 16, "int8"),
             "Q5_0": Format(_q5_0, 32, "int8"), "Q4_0": Format(_q4_0_int8, 32, "int8")},
    "int4": {"Q4_K": Format(_q4_k, 32, "int4"), "Q4_1": Format(_q4_1, 32, "int4"),
             "Q4_0": Format(_q4_0_int4, 32, "int4")},
}
DECODERS["gguf"] = {**DECODERS["int8"], **DECODERS["int4"]}


class GgufCheckpoint:
    """The tensors of a GGUF file under the names of ``module``'s weights (transformers'
    GGUF name map), decoded on demand for a scheme ("int8", "int4" or "gguf": each
    format as the representation that holds it exactly)."""

    def __init__(self, path: str | Path, module: torch.nn.Module, scheme: str) -> None:
        from gguf import GGUFReader
        from transformers.modeling_gguf_pytorch_utils import (
            TENSOR_PROCESSORS,
            TensorProcessor,
            get_gguf_hf_weights_map,
        )

        self.path, self.scheme = Path(path), scheme
        reader = GGUFReader(self.path)
        field = reader.fields.get("general.architecture")
        architecture = field.contents() if field is not None else ""
        processor = TENSOR_PROCESSORS.get(architecture, TensorProcessor)()
        names = get_gguf_hf_weights_map(module, processor)
        self._tensors = {names[t.name]: t for t in reader.tensors if t.name in names}

    def format(self, weight_name: str) -> str | None:
        """The GGUF type of a weight (e.g. "Q8_0"), or None when the file lacks it."""
        tensor = self._tensors.get(weight_name)
        return None if tensor is None else tensor.tensor_type.name

    def keeps(self, weight_name: str) -> bool:
        return self.format(weight_name) in DECODERS[self.scheme]

    def representation(self, weight_name: str) -> str:
        """How a kept weight is stored, e.g. "int8 g32 (GGUF Q8_0)"."""
        kind = self.format(weight_name)
        kept = DECODERS[self.scheme][kind]
        return f"{kept.bits} g{kept.group} (GGUF {kind})"

    def shape(self, weight_name: str) -> tuple[int, ...]:
        """The stored tensor's shape in torch's order (GGUF lists dimensions fastest first)."""
        return tuple(int(n) for n in reversed(self._tensors[weight_name].shape))

    def decode(self, weight_name: str) -> tuple[torch.Tensor, ...]:
        """``weight_name`` as ttpu's tensors: int8 ``[out, in]`` values (or int4 packed
        into uint8 ``[out, in / 2]``), float32 scales ``[out, in / group]`` and, for
        int4, the minimums."""
        from gguf import GGML_QUANT_SIZES

        tensor = self._tensors[weight_name]
        decoder, group, _ = DECODERS[self.scheme][tensor.tensor_type.name]
        _, bytes_per_block = GGML_QUANT_SIZES[tensor.tensor_type]
        out, inputs = self.shape(weight_name)
        values, scale, minimum = decoder(np.asarray(tensor.data).reshape(-1, bytes_per_block))
        values = torch.from_numpy(values.reshape(out, inputs).copy())
        if values.dtype == torch.uint8:  # int4: two per byte
            values = pack_int4(values)
        groups = (out, inputs // group)
        return (values, torch.from_numpy(scale.reshape(groups).copy()),
                None if minimum is None else torch.from_numpy(minimum.reshape(groups).copy()))

    def matches(self, weight_name: str, weight: torch.Tensor) -> bool:
        """Whether the stored blocks dequantize to exactly ``weight`` (in its dtype)."""
        if self.shape(weight_name) != tuple(weight.shape):
            return False  # the loader reshaped or transposed it
        values, scale, minimum = self.decode(weight_name)
        for start in range(0, weight.shape[0], CHECK_ROWS):
            rows = slice(start, start + CHECK_ROWS)
            restored = dequantize(values[rows], scale[rows], torch.float32, None if minimum is None else minimum[rows])
            if not torch.equal(restored.to(weight.dtype), weight.detach()[rows]):
                return False
        return True
