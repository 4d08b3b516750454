"""Quantized weights (int8 / int4 + scales), the contractions that use them, quantizers."""

from jaxinfer.quant.calibrate import Quantizer
from jaxinfer.quant.model import CONTRACTION_AXES, param_bytes, quantize_params
from jaxinfer.quant.qarray import (
    PRECISIONS,
    Probe,
    QArray,
    check_quant,
    dequantize,
    einsum,
    is_quantized,
    keeps_structure,
    quantize,
    take,
)

__all__ = [
    "CONTRACTION_AXES", "PRECISIONS", "Probe", "QArray", "Quantizer", "check_quant",
    "dequantize", "einsum", "is_quantized", "keeps_structure", "param_bytes", "quantize",
    "quantize_params", "take",
]
