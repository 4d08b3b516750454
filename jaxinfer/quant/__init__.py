"""Quantized weights (int8 / int4 + scales) and the contractions that use them."""

from jaxinfer.quant.qarray import (
    PRECISIONS,
    QArray,
    check_quant,
    dequantize,
    einsum,
    is_quantized,
    quantize,
    take,
)

__all__ = [
    "PRECISIONS", "QArray", "check_quant", "dequantize", "einsum", "is_quantized", "quantize",
    "take",
]
