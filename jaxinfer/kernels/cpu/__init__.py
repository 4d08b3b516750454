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

`attention` is decode attention against a dense or paged KV cache (fp32, bf16 or int8 with
per-token scales), read in place: each (row, query, kv head) reads only the keys its query
sees, so the work follows each row's own length, and a row's output is bitwise the same
whatever else is in the batch and however many queries its row has.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxinfer.kernels.cpu.build import ISAS, available_isas, load

ACTIVATIONS = ("int8", "f32")
MAX_ROWS = 64  # beyond this many rows (prefill), XLA's dense products are faster
# Beyond this many queries per row (prefill), blocked XLA attention's batched dots are faster:
# the kernel takes one query at a time (ModelConfig.batch_invariant: it takes any number).
MAX_QUERIES = 16
CACHE_DTYPES = (jnp.float32, jnp.bfloat16, jnp.int8)

__all__ = ["ACTIVATIONS", "ISAS", "MAX_QUERIES", "MAX_ROWS", "attention", "attention_supports",
           "available", "available_isas", "qmatmul", "set_enabled", "supports", "usable_here"]

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


def usable_here() -> bool:
    """`available()`, and no multi-device mesh is active: a custom call is opaque to the
    partitioner, so under one the callers take XLA's path."""
    mesh = jax.sharding.get_abstract_mesh()
    return (mesh.empty or mesh.size == 1) and available()


def supports(bits: int, group: int, in_dim: int) -> bool:
    """Whether a weight with this format and contraction length has a kernel: `in` a multiple
    of 32, and groups of a power of two from 32 up (or one group per row)."""
    power_of_two = group >= 32 and group & (group - 1) == 0
    return bits in (4, 8) and in_dim % 32 == 0 and (power_of_two or group == in_dim)


def _isa_attr(isa: str) -> np.int64:
    if isa != "auto" and isa not in available_isas():
        raise ValueError(f"isa={isa!r}; this CPU runs: {', '.join(available_isas())}")
    return np.int64(ISAS.get(isa, 0))


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
    isa_attr = _isa_attr(isa)
    call = jax.ffi.ffi_call(
        "jaxinfer_qmatmul", jax.ShapeDtypeStruct((x.shape[0], out), jnp.float32),
        vmap_method="sequential",
    )
    return call(
        x.astype(jnp.float32), values, scales.astype(jnp.float32),
        scales.astype(jnp.float32) if zeros is None else zeros.astype(jnp.float32),
        jnp.asarray(layer, jnp.int32),
        bits=np.int64(bits), group=np.int64(group), isa=isa_attr,
        act_int8=np.int64(activations == "int8"),
    )


def attention_supports(q: jax.Array, k: jax.Array, max_queries: int | None = MAX_QUERIES) -> bool:
    """Whether `attention` takes these queries [batch, seq, heads, head_dim] against a cache
    of k's dtype, with at most `max_queries` per row (None: any number); the kernels must be
    available too (see `available`)."""
    short = max_queries is None or q.shape[1] <= max_queries
    return short and any(k.dtype == t for t in CACHE_DTYPES)


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    q_positions: jax.Array,
    *,
    layer: jax.Array | int | None = None,
    scales: tuple[jax.Array, jax.Array] | None = None,
    page_table: jax.Array | None = None,
    window: jax.Array | int | None = None,
    softcap: float | None = None,
    scale: float | None = None,
    kv_lengths: jax.Array | None = None,
    sinks: jax.Array | None = None,
    isa: str = "auto",
    max_queries: int | None = MAX_QUERIES,
) -> jax.Array:
    """`jaxinfer.pallas.reference.attention` (page_table None: k, v [batch, kv_heads, max_len,
    head_dim]) or `reference.paged_attention` (k, v [kv_heads, num_pages, page_size,
    head_dim], page_table [batch, pages_per_seq]); either with a leading layers axis when
    `layer` picks one (read in place). An int8 cache comes with `scales` (k's, v's: k's shape
    without head_dim); `sinks` [heads]: gpt-oss's per-head logit in each softmax's
    denominator. Up to `max_queries` queries per row (None: any number, as a prefill for
    ModelConfig.batch_invariant). Output [batch, seq, heads, head_dim] in q's dtype."""
    if load() is None:
        raise RuntimeError("the CPU kernels are not available (see the warning at load)")
    if not attention_supports(q, k, max_queries):
        raise ValueError(f"the attention kernel takes up to {max_queries} queries per row "
                         f"against a float32, bfloat16 or int8 cache; got q {q.shape}, "
                         f"cache {k.dtype}")
    if (k.dtype == jnp.int8) != (scales is not None):
        raise ValueError("an int8 cache needs its scales, and only an int8 cache has them")
    batch, seq, heads, head_dim = q.shape
    if layer is None:
        k, v = k[None], v[None]
        scales = None if scales is None else (scales[0][None], scales[1][None])
    paged = page_table is not None
    kv_heads = k.shape[1] if paged else k.shape[2]
    if k.ndim != 5 or k.shape[-1] != head_dim or heads % kv_heads or (
            not paged and k.shape[1] != batch):
        raise ValueError(f"q {q.shape} does not fit the cache {k.shape}")
    none = jnp.zeros((1,), jnp.int32)
    k_scale, v_scale = (jnp.zeros((1,), jnp.float32),) * 2 if scales is None else scales
    call = jax.ffi.ffi_call(
        "jaxinfer_attention", jax.ShapeDtypeStruct(q.shape, jnp.float32),
        vmap_method="sequential",
    )
    out = call(
        q.astype(jnp.float32), k, v, k_scale.astype(jnp.float32), v_scale.astype(jnp.float32),
        page_table.astype(jnp.int32) if paged else none.reshape(1, 1),
        q_positions.astype(jnp.int32),
        none if kv_lengths is None else kv_lengths.astype(jnp.int32),
        jnp.asarray(0 if window is None else window, jnp.int32),
        jnp.zeros((1,), jnp.float32) if sinks is None else sinks.astype(jnp.float32),
        jnp.asarray(0 if layer is None else layer, jnp.int32),
        paged=np.int64(paged), has_lengths=np.int64(kv_lengths is not None),
        has_window=np.int64(window is not None), has_sinks=np.int64(sinks is not None),
        softcap=np.float32(softcap or 0.0), scale=np.float32(head_dim**-0.5 if scale is None
                                                            else scale),
        isa=_isa_attr(isa),
    )
    return out.astype(q.dtype)
