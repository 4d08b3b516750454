"""Quantized weights (int8 / int4 + scales) and the contractions that use them."""

from jaxinfer.quant.model import CONTRACTION_AXES, param_bytes, quantize_params
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
    "CONTRACTION_AXES", "PRECISIONS", "QArray", "check_quant", "dequantize", "einsum",
    "is_quantized", "param_bytes", "quantize", "quantize_params", "take",
]
