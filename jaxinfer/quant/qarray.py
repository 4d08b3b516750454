"""Quantized weights: integer values plus per-group scales (and zero points), as a pytree.

A `QArray` stands in for a float weight anywhere the model contracts with one. Values are
quantized along the weight's contraction axis (`axis`, negative) in groups of `group`:

    w = q * scale                 int8, symmetric (q in [-127, 127])
    w = q * scale + zero          int4, affine (q in [0, 15], two per byte)

Per-output-channel int8 is one group spanning the whole contraction axis. GGUF's Q8_0,
Q4_0, Q4_1 and Q4_K blocks map onto these forms exactly, so such files can stay quantized.

Storage puts the contraction axis last ([..., out, in], as GGUF and PyTorch do), whatever
the float weight's layout: XLA:CPU only runs a fused int8 matrix-vector product at memory
speed as a row reduction over the minor axis. int4 packing: within each group, byte i holds
element i in its low nibble and element i + group/2 in its high nibble (GGUF's Q4_0 block).
"""

from __future__ import annotations

import dataclasses
import string

import jax
import jax.numpy as jnp
import numpy as np

PRECISIONS = {"int8": 8, "int4": 4}
GROUP_SIZES = (32, 64, 128)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QArray:
    """values: int8, or uint8 with two int4 per byte, shaped [..., in] (`in` halved for int4);
    scales (and zeros): [..., in / group]. The float weight has the `in` axis at `axis`
    (negative, so a leading stacked-layers axis sliced by `lax.scan` does not move it)."""

    values: jax.Array
    scales: jax.Array
    zeros: jax.Array | None
    bits: int = dataclasses.field(metadata=dict(static=True))
    group: int = dataclasses.field(metadata=dict(static=True))
    axis: int = dataclasses.field(metadata=dict(static=True))

    @property
    def shape(self) -> tuple[int, ...]:
        """The float weight's shape."""
        stored = list(self.values.shape)
        stored[-1] *= 8 // self.bits
        stored.insert(self.axis % len(stored), stored.pop())  # the `in` axis back to `axis`
        return tuple(stored)

    @property
    def ndim(self) -> int:
        return self.values.ndim

    @property
    def dtype(self):
        return self.scales.dtype

    @property
    def nbytes(self) -> int:
        parts = (self.values, self.scales, self.zeros)
        return sum(p.size * p.dtype.itemsize for p in parts if p is not None)

    def astype(self, dtype) -> QArray:
        """Scales (and zeros) in `dtype`; integer values stay as they are."""
        zeros = None if self.zeros is None else self.zeros.astype(dtype)
        return dataclasses.replace(self, scales=self.scales.astype(dtype), zeros=zeros)

    def __getitem__(self, index) -> QArray:
        """Indexes leading axes only (one layer of a stacked weight, rows of a table)."""
        zeros = None if self.zeros is None else self.zeros[index]
        return dataclasses.replace(
            self, values=self.values[index], scales=self.scales[index], zeros=zeros
        )


def stored_shape(shape: tuple[int, ...], axis: int) -> tuple[int, ...]:
    """A float weight's shape with its contraction `axis` moved last (how QArray stores it)."""
    dims = list(shape)
    return (*dims[: axis % len(dims)], *dims[axis % len(dims) + 1 :], dims[axis])


def check_quant(precision: str, group: int | None = None, dim: int | None = None) -> None:
    """Raises ValueError for an unknown precision or a group size the dimension can't take."""
    if precision not in PRECISIONS:
        raise ValueError(f"quant={precision!r}; allowed: {', '.join(PRECISIONS)}")
    if group is None:
        return
    if group not in GROUP_SIZES:
        raise ValueError(f"group size {group}; allowed: {', '.join(map(str, GROUP_SIZES))}")
    if dim is not None and dim % group:
        raise ValueError(f"group size {group} does not divide the quantized dimension {dim}")


def _grouped(x, group: int):
    """[..., n] -> [..., n / group, group]."""
    return x.reshape(*x.shape[:-1], x.shape[-1] // group, group)


def quantize(
    w: jax.Array | np.ndarray,
    precision: str = "int8",
    *,
    axis: int = -1,
    group: int | None = None,
    clip: float | jax.Array = 1.0,
) -> QArray:
    """Quantizes float `w` along its contraction `axis` (negative): int8 symmetric, or int4
    affine. group=None: one group over the whole axis for int8 (per output channel), 32 for
    int4. `clip` (a scalar, or one per group: [..., out, in / group] in storage order) shrinks
    each group's range; values beyond it saturate. Works on numpy arrays (at load time, on
    the host) and on jax arrays."""
    if axis >= 0:
        raise ValueError(f"axis={axis}: pass the contraction axis as a negative index")
    dim = w.shape[axis]
    if precision == "int4" and group is None:
        group = 32
    check_quant(precision, group, dim)
    group = group or dim
    xp = np if isinstance(w, np.ndarray) else jnp
    g = _grouped(xp.moveaxis(w, axis, -1).astype(np.float32), group)
    clip = xp.asarray(clip, np.float32)[..., None] if np.ndim(clip) else clip
    if precision == "int8":
        scale = clip * xp.max(xp.abs(g), axis=-1, keepdims=True) / 127
        q = xp.clip(xp.round(g / xp.where(scale == 0, 1, scale)), -127, 127)
        return QArray(q.astype(np.int8).reshape(*g.shape[:-2], dim), scale[..., 0], None,
                      8, group, axis)
    low, high = xp.min(g, axis=-1, keepdims=True), xp.max(g, axis=-1, keepdims=True)
    center, radius = (high + low) / 2, clip * (high - low) / 2
    low, scale = center - radius, 2 * radius / 15
    q = xp.clip(xp.round((g - low) / xp.where(scale == 0, 1, scale)), 0, 15).astype(np.uint8)
    half = group // 2
    packed = (q[..., :half] | (q[..., half:] << 4)).astype(np.uint8)
    return QArray(packed.reshape(*g.shape[:-2], dim // 2), scale[..., 0], low[..., 0],
                  4, group, axis)


def unpack_int4(values: jax.Array, group: int) -> jax.Array:
    """uint8 [..., n / 2] -> uint8 values in [0, 15], [..., n] (packed per group)."""
    g = _grouped(values, group // 2)
    q = jnp.concatenate([g & 15, g >> 4], axis=-1)
    return q.reshape(*values.shape[:-1], values.shape[-1] * 2)


def _dequantize_stored(w: QArray, dtype) -> jax.Array:
    """The float weight in storage order ([..., out, in])."""
    q = unpack_int4(w.values, w.group) if w.bits == 4 else w.values
    out = _grouped(q.astype(dtype), w.group) * w.scales.astype(dtype)[..., None]
    if w.zeros is not None:
        out = out + w.zeros.astype(dtype)[..., None]
    return out.reshape(q.shape)


def dequantize(w: QArray, dtype=jnp.float32) -> jax.Array:
    """The float weight `w` stands for, in its own layout and `dtype`."""
    return jnp.moveaxis(_dequantize_stored(w, dtype), -1, w.axis)


def take(w: jax.Array | QArray, indices: jax.Array, dtype) -> jax.Array:
    """Rows `w[indices]` (an embedding lookup) in `dtype`; only those rows are dequantized."""
    if isinstance(w, Probe):
        w = w.weight
    if hasattr(w, "materialize"):  # a cpu_kernels.InPlace view: a gather reads it in place too
        w = w.materialize()
    if not isinstance(w, QArray):
        return w[indices].astype(dtype)
    if w.axis != -1 or w.ndim != 2:
        raise ValueError("quantized lookups need a [rows, dim] table quantized along dim")
    return dequantize(w[indices], dtype)


# Up to this many rows (batch x tokens) an int8 product on CPU runs as fused row
# reductions, which read the weight once at memory speed; XLA:CPU's dot would first
# materialise a float copy of it (DESIGN.md, "Measured on this machine").
CPU_FUSED_ROWS = 4


def is_quantized(x) -> bool:
    return isinstance(x, QArray)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Probe:
    """A float weight that reports what it is multiplied with (for calibration): each product
    sends the mean square of its inputs per contracted channel to `recorder(name, layer,
    moments)` on the host. `layer` is scanned with stacked weights (-1 for global ones)."""

    weight: jax.Array
    layer: jax.Array
    name: str = dataclasses.field(metadata=dict(static=True))

    @property
    def shape(self) -> tuple[int, ...]:
        return self.weight.shape

    def astype(self, dtype) -> Probe:
        return dataclasses.replace(self, weight=self.weight.astype(dtype))


def keeps_structure(x) -> bool:
    """Weights that stay whole under the model's dtype casts (quantized or probed)."""
    return isinstance(x, QArray | Probe)


recorder = None  # set by calibration: called as recorder(name, layer, moments)


def _record(spec: str, x: jax.Array, w: Probe) -> None:
    x_letters, w_letters, _ = _letters(spec, x)
    contracted = "".join(c for c in w_letters if c in x_letters)
    moments = jnp.einsum(f"{x_letters}->{contracted}", jnp.square(x.astype(jnp.float32)))
    moments = moments / (x.size // moments.size)  # mean over the rows
    jax.debug.callback(lambda layer, m: recorder(w.name, int(layer), np.asarray(m)),
                       w.layer, moments)


def _letters(spec: str, x: jax.Array) -> tuple[str, str, str]:
    """(x letters, w letters, output letters) of an einsum spec, with x's ellipsis named."""
    inputs, out = spec.split("->")
    x_letters, w_letters = inputs.split(",")
    if "..." in x_letters:
        spare = "".join(c for c in string.ascii_letters if c not in spec)
        extra = spare[: x.ndim - len(x_letters) + 3]
        x_letters, out = x_letters.replace("...", extra), out.replace("...", extra)
    return x_letters, w_letters, out


def einsum(spec: str, x: jax.Array, w: jax.Array | QArray, out_dtype=None) -> jax.Array:
    """`jnp.einsum(spec, x, w)` in x's dtype, where `w` may be quantized (then accumulated in
    fp32); the result in `out_dtype` (default: x's dtype).

    On accelerators the dequantization is an elementwise producer that XLA fuses into the
    dot. On CPU, a `cpu_kernels.InPlace` view runs on the CPU kernels where they apply;
    otherwise few-row products with per-channel int8 (decoding) use fused row reductions.
    """
    if isinstance(w, Probe):
        if recorder is not None:
            _record(spec, x, w)
        w = w.weight
    if hasattr(w, "materialize"):  # a cpu_kernels.InPlace view (which imports this module)
        y = w.product(spec, x)
        if y is not None:
            return y.astype(out_dtype or x.dtype)
        w = w.materialize()
    if not isinstance(w, QArray):
        return jnp.einsum(spec, x, w.astype(x.dtype), preferred_element_type=out_dtype)
    out_dtype = out_dtype or x.dtype
    fast = _fused_rows_plan(spec, x, w)
    if fast is not None:
        return _fused_rows(fast, x, w).astype(out_dtype)
    out = jnp.einsum(spec, x, dequantize(w, x.dtype), preferred_element_type=jnp.float32)
    return out.astype(out_dtype)


def _fused_rows_plan(spec: str, x: jax.Array, w: QArray):
    """Letter bookkeeping for `_fused_rows`, or None when the product doesn't qualify."""
    if jax.default_backend() != "cpu" or w.bits != 8 or w.zeros is not None:
        return None
    x_letters, w_letters, out = _letters(spec, x)
    contracted = [c for c in w_letters if c in x_letters]
    if len(contracted) != 1 or w_letters.index(contracted[0]) - len(w_letters) != w.axis:
        return None
    rows = [c for c in x_letters if c not in w_letters]
    n_rows = int(np.prod([x.shape[x_letters.index(c)] for c in rows], dtype=np.int64))
    if n_rows > CPU_FUSED_ROWS or w.group != w.shape[w.axis]:
        return None
    w_free = [c for c in w_letters if c != contracted[0]]  # storage order: [..., out, in]
    return x_letters, rows, contracted[0], w_free, out


def _fused_rows(plan, x: jax.Array, w: QArray) -> jax.Array:
    x_letters, rows, c, w_free, out = plan
    xr = jnp.transpose(x, [x_letters.index(k) for k in rows + [c]]).astype(jnp.float32)
    row_shape = xr.shape[:-1]
    xr = xr.reshape(-1, xr.shape[-1])
    w2 = w.values.reshape(-1, w.values.shape[-1])  # [out, in]: one row reduction per output
    scale = w.scales.reshape(-1).astype(jnp.float32)
    free_shape = w.values.shape[:-1]
    results = [jnp.sum(w2.astype(jnp.float32) * xr[r], axis=-1) * scale for r in range(len(xr))]
    y = jnp.stack(results).reshape(*row_shape, *free_shape)
    have = "".join(rows + w_free)
    return jnp.transpose(y, [have.index(k) for k in out])
