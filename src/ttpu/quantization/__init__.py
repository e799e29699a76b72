"""Weight-only quantization: int8 (a scale per output channel) and int4 (groups along the
input dimension, two values per byte) for linear layers and, optionally, the token
embedding (with a tied LM head, one stored table serves both). Loaded from a GGUF, the
block formats that map exactly onto these (Q8_0, Q6_K, Q5_0, Q4_0, Q4_1, Q4_K) are kept
as stored instead of re-quantized.

Quantized layers are torch modules swapped in before tracing, so both backends run the
same code: the weights stay int8/uint8 with float scales wherever the backend keeps
parameters, and dequantization is a convert next to the matmul inside the compiled
program.
"""

from ttpu.quantization.config import SCHEMES, QuantizationConfig, resolve_quantization
from ttpu.quantization.modules import QuantizationReport, quantize_module

__all__ = ["SCHEMES", "QuantizationConfig", "QuantizationReport", "quantize_module", "resolve_quantization"]
