"""GGUF quantized blocks -> QArrays, without going through floats.

Q8_0 is int8 in groups of 32 with one fp16 scale; Q4_0, Q4_1 and Q4_K are 4-bit values in
groups of 32 with a scale and an offset (Q4_0: offset -8 * scale; Q4_K: 6-bit sub-block
scales and mins under fp16 super-block factors). Those map exactly onto `quant.QArray`;
other types return None and the loader falls back to dequantize-then-quantize.
"""

from __future__ import annotations

import gguf
import numpy as np

from jaxinfer.quant import QArray

T = gguf.GGMLQuantizationType
NATIVE_TYPES = (T.Q8_0, T.Q4_0, T.Q4_1, T.Q4_K)


def _f16(raw: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(raw).view(np.float16)[..., 0].astype(np.float32)


def blocks(tensor: gguf.ReaderTensor) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, int]:
    """(values, scales, zeros, bits) of a quantized GGUF matrix in numpy order [out, in]:
    int8 values, or uint8 with two 4-bit values per byte packed as `quant.QArray` does."""
    data = np.asarray(tensor.data)  # [rows, bytes per row]
    rows = data.shape[0]
    kind = tensor.tensor_type
    _, type_size = gguf.GGML_QUANT_SIZES[kind]
    b = data.reshape(rows, -1, type_size)  # [rows, blocks, bytes]
    n_blocks = b.shape[1]
    if kind == T.Q8_0:
        values = np.ascontiguousarray(b[..., 2:]).view(np.int8).reshape(rows, -1)
        return values, _f16(b[..., :2]), None, 8
    if kind == T.Q4_0:
        scale = _f16(b[..., :2])
        return b[..., 2:].reshape(rows, -1), scale, -8 * scale, 4
    if kind == T.Q4_1:
        return b[..., 4:].reshape(rows, -1), _f16(b[..., :2]), _f16(b[..., 2:4]), 4
    if kind == T.Q4_K:
        d, dmin = _f16(b[..., :2]), _f16(b[..., 2:4])
        sc, mn = gguf.quants.Q4_K.get_scale_min(b[..., 4:16].reshape(-1, 12))
        scales = d[..., None] * sc.reshape(rows, n_blocks, 8)
        zeros = -dmin[..., None] * mn.reshape(rows, n_blocks, 8)
        # 128 bytes per 256 values: byte i of chunk c holds sub-block 2c (low nibble) and
        # 2c + 1 (high nibble) at position i; regroup into 32-value groups, 16 bytes each.
        qs = b[..., 16:].reshape(rows, n_blocks, 4, 32)
        q = np.stack([qs & 15, qs >> 4], axis=3).reshape(rows, n_blocks, 8, 32)
        packed = q[..., :16] | (q[..., 16:] << 4)
        return (packed.reshape(rows, -1), scales.reshape(rows, -1), zeros.reshape(rows, -1), 4)
    raise AssertionError(kind)


def stack(layers: list[QArray]) -> QArray | None:
    """Per-layer QArrays stacked on a leading `layers` axis; None if their formats differ
    (mixed-type files such as Q4_K_M quantize some layers' copies of a weight differently)."""
    first = layers[0]
    formats = {(q.bits, q.group, q.axis, q.zeros is None, q.values.shape) for q in layers}
    if len(formats) > 1:
        return None
    zeros = None if first.zeros is None else np.stack([q.zeros for q in layers])
    return QArray(np.stack([q.values for q in layers]), np.stack([q.scales for q in layers]),
                  zeros, first.bits, first.group, first.axis)


def to_qarray(tensor: gguf.ReaderTensor, stored_shape: tuple[int, ...], axis: int,
              rows_order=None) -> QArray | None:
    """The tensor as a numpy-backed QArray whose storage is `stored_shape` ([..., in]) and
    whose float weight has the `in` axis at `axis`; `rows_order(x)` rearranges the [out, ...]
    rows (e.g. the rotary un-permutation and head split). None for non-native types."""
    if tensor.tensor_type not in NATIVE_TYPES or stored_shape[-1] % 32:
        return None  # (a head_dim under 32 splits blocks across our wo's groups)
    values, scales, zeros, bits = blocks(tensor)
    arrange = rows_order or (lambda x: x)
    values, scales = arrange(values), arrange(scales)
    zeros = None if zeros is None else arrange(zeros)
    groups = stored_shape[-1] // 32
    lead = stored_shape[:-1]
    return QArray(
        values.reshape(*lead, -1),
        scales.reshape(*lead, groups),
        None if zeros is None else zeros.reshape(*lead, groups),
        bits, 32, axis,
    )
