"""CPU kernels as XLA FFI custom calls: quantized matrix products at memory bandwidth.

`qmatmul` computes y[rows, out] = x[rows, parts * in] @ W^T for one layer of a stacked
quantized weight, read where it lies (the layer index is an operand, so `lax.scan` over
layers copies no weight slice). W is jaxinfer's QArray storage: int8 values with per-group
scales (GGUF Q8_0, int8 per channel or in groups) or two 4-bit values per byte with scales
and zero points (GGUF Q4_0 / Q4_1 / Q4_K, int4). `parts` > 1 contracts over a leading
weight axis too (the attention output projection, [heads, embed, head_dim]).

Activations are quantized inside the kernel per block of 32 values to int8, as llama.cpp
does ("int8", the default: integer dot products with VNNI), or used as fp32 ("f32").
Outputs are split over XLA's intra-op threads by output rows only, so every output is the
same whatever the number of rows. The library is built on first use (`build.load`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxinfer.kernels.cpu.build import ISAS, available_isas, load

ACTIVATIONS = ("int8", "f32")
MAX_ROWS = 64  # beyond this many rows (prefill), XLA's dense products are faster

__all__ = ["ACTIVATIONS", "ISAS", "MAX_ROWS", "available", "available_isas", "qmatmul",
           "set_enabled", "supports"]

_enabled = True


def set_enabled(enabled: bool) -> None:
    """Process-wide switch (tests' `--cpu-kernels=off`, CI's fallback run): when off, every
    model uses XLA's products whatever its config says. Set it before the first compile;
    programs compiled earlier keep what they were traced with."""
    global _enabled
    _enabled = bool(enabled)


def available() -> bool:
    """True when the kernels are switched on, built and registered (always False off CPU)."""
    return _enabled and jax.default_backend() == "cpu" and load() is not None


def supports(bits: int, group: int, in_dim: int) -> bool:
    """Whether a weight with this format and contraction length has a kernel: `in` a multiple
    of 32, and groups of a power of two from 32 up (or one group per row)."""
    power_of_two = group >= 32 and group & (group - 1) == 0
    return bits in (4, 8) and in_dim % 32 == 0 and (power_of_two or group == in_dim)


def qmatmul(
    x: jax.Array,
    values: jax.Array,
    scales: jax.Array,
    zeros: jax.Array | None,
    layer: jax.Array | int,
    *,
    group: int,
    isa: str = "auto",
    activations: str = "int8",
) -> jax.Array:
    """y [rows, out] (fp32) = x [rows, parts * in] @ W[layer]^T.

    values: [layers, parts, out, in] int8, or [layers, parts, out, in / 2] uint8 (int4);
    scales, zeros: [layers, parts, out, in / group] fp32 (zeros: int4 only). isa: "auto" or
    one of `available_isas()` (a test hook); activations: "int8" or "f32".
    """
    if load() is None:
        raise RuntimeError("the CPU kernels are not available (see the warning at load)")
    bits = 8 if values.dtype == jnp.int8 else 4
    if values.ndim != 4 or x.ndim != 2:
        raise ValueError(f"qmatmul takes x [rows, k] and values [layers, parts, out, in]; got "
                         f"x {x.shape}, values {values.shape}")
    layers, parts, out, stored_in = values.shape
    in_dim = stored_in * (8 // bits)
    if x.shape[1] != parts * in_dim:
        raise ValueError(f"x has {x.shape[1]} columns; the weight contracts over "
                         f"{parts} x {in_dim}")
    if not supports(bits, group, in_dim):
        raise ValueError(f"no kernel for int{bits} groups of {group} over {in_dim} inputs")
    if scales.shape != (layers, parts, out, in_dim // group):
        raise ValueError(f"scales {scales.shape}; expected {(layers, parts, out, in_dim // group)}")
    if activations not in ACTIVATIONS:
        raise ValueError(f"activations={activations!r}; allowed: {', '.join(ACTIVATIONS)}")
    if isa != "auto" and isa not in available_isas():
        raise ValueError(f"isa={isa!r}; this CPU runs: {', '.join(available_isas())}")
    call = jax.ffi.ffi_call(
        "jaxinfer_qmatmul", jax.ShapeDtypeStruct((x.shape[0], out), jnp.float32),
        vmap_method="sequential",
    )
    return call(
        x.astype(jnp.float32), values, scales.astype(jnp.float32),
        scales.astype(jnp.float32) if zeros is None else zeros.astype(jnp.float32),
        jnp.asarray(layer, jnp.int32),
        bits=np.int64(bits), group=np.int64(group), isa=np.int64(ISAS.get(isa, 0)),
        act_int8=np.int64(activations == "int8"),
    )
