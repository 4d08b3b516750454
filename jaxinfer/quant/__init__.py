"""Quantized weights (int8 / int4 + scales), the contractions that use them, quantizers."""

from jaxinfer.quant.calibrate import Quantizer
from jaxinfer.quant.cpu_kernels import InPlace, in_place, layer_views, split_stacked
from jaxinfer.quant.model import (
    CONTRACTION_AXES,
    active_param_bytes,
    param_bytes,
    quantize_params,
)
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
    "CONTRACTION_AXES", "PRECISIONS", "InPlace", "Probe", "QArray", "Quantizer",
    "active_param_bytes", "check_quant",
    "dequantize", "einsum", "in_place", "is_quantized", "keeps_structure", "layer_views",
    "param_bytes", "quantize", "quantize_params", "split_stacked", "take",
]
