"""Flash attention for prefill: blocked online-softmax attention against a dense KV cache.

Query rows are (token, head) pairs of one grouped-query group: q [batch, seq, heads, d] is
regrouped to [batch, kv_heads, seq * group, d], so every K/V block read serves all heads of
its group and repeated K/V are never materialised. Each row carries its token's position;
key slot j is visible to a row at position p iff j <= p, p - j < window and j < kv_length
(as `reference.visible`). The wrapper computes, per block of rows, the range of KV blocks
that can hold a visible key, so fully masked blocks (past the causal diagonal, before the
window, past the row's length) are never read.

Two drivers share the per-block math (`online_softmax_step`):
- "gpu" (Triton lowering): the grid runs over (batch, kv_head, row block); each program
  loops over its KV blocks with `lax.fori_loop`, carrying the softmax state in registers.
- "tpu" (Mosaic lowering): KV blocks are the last, sequential grid axis; the softmax state
  lives in VMEM scratch, the block bounds are scalar-prefetched into SMEM and the K/V index
  maps clamp to them, so skipped blocks cost no DMA.
Both run on CPU with `interpret=True`, which is how the tests check them.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

SUPPORTED_HEAD_DIMS = (64, 128, 256)
PLATFORMS = ("gpu", "tpu")
MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)  # finite: keeps exp() and Triton NaN-free
NO_WINDOW = 1 << 30  # a window no sequence reaches
META = 4  # per row block: first KV block, end KV block, kv length, window


# ----------------------------------------------------------------------------- shared math


def _dot(a, b, b_axis: int, upcast: bool):
    """a [m, n] contracted with b over b's axis `b_axis`, accumulated in fp32. `upcast` widens
    the inputs first (interpret mode: XLA:CPU has no bf16 x bf16 -> fp32 dot; bf16 products
    are exact in fp32, so the result is the same)."""
    if upcast:
        a, b = a.astype(jnp.float32), b.astype(jnp.float32)
    dims = (((1,), (b_axis,)), ((), ()))
    return jax.lax.dot_general(a, b, dims, preferred_element_type=jnp.float32)


def online_softmax_step(q, k, v, mask, m, total, acc, *, scale: float, softcap: float | None,
                        upcast: bool = False):
    """Folds one block of keys into the running state of a block of rows.

    q: [rows, d]; k, v: [keys, d]; mask: [rows, keys]; m, total: [rows, 1] running max and sum
    of exp(score - m); acc: [rows, d] fp32 running sum of exp(score - m) * v.
    """
    s = _dot(q, k, 1, upcast)  # q k^T
    s = s * scale
    if softcap is not None:
        s = softcap * jnp.tanh(s / softcap)
    s = jnp.where(mask, s, MASK_VALUE)
    m_next = jnp.maximum(m, jnp.max(s, axis=1, keepdims=True))
    alpha = jnp.exp(m - m_next)
    p = jnp.where(mask, jnp.exp(s - m_next), 0.0)  # masked keys add 0, even in empty rows
    total_next = alpha * total + jnp.sum(p, axis=1, keepdims=True)
    pv = _dot(p.astype(v.dtype), v, 0, upcast)
    return m_next, total_next, alpha * acc + pv


def finish(total, acc):
    """The normalised output; rows that saw no visible key get zeros."""
    return acc / jnp.where(total > 0, total, 1.0)


def key_mask(row_pos, start, n_keys: int, kv_len, window, platform: str):
    """[rows, n_keys] visibility of key slots start.. to rows at positions row_pos [rows, 1]."""
    if platform == "tpu":  # Mosaic wants 2-D iotas
        keys = start + jax.lax.broadcasted_iota(jnp.int32, (1, n_keys), 1)
    else:
        keys = start + jnp.arange(n_keys, dtype=jnp.int32)[None, :]
    return (keys <= row_pos) & (row_pos - keys < window) & (keys < kv_len)


# ------------------------------------------------------------------ shapes and row layout


def check_shapes(q: jax.Array, kv_heads: int, kv_head_dim: int) -> None:
    """Trace-time checks shared by the kernels; errors name the numbers and what is allowed."""
    heads, head_dim = q.shape[2], q.shape[3]
    if head_dim not in SUPPORTED_HEAD_DIMS:
        raise ValueError(
            f"head_dim={head_dim} is not supported by the Pallas attention kernels; supported: "
            f"{', '.join(map(str, SUPPORTED_HEAD_DIMS))} (use attention='xla' for this model)"
        )
    if kv_head_dim != head_dim:
        raise ValueError(f"keys have head_dim={kv_head_dim} but queries have {head_dim}")
    if heads % kv_heads:
        raise ValueError(f"n_heads={heads} is not a multiple of n_kv_heads={kv_heads}")


def check_platform(platform: str | None) -> str:
    if platform is None:
        return jax.default_backend() if jax.default_backend() in PLATFORMS else "gpu"
    if platform not in PLATFORMS:
        raise ValueError(f"platform={platform!r}; allowed: {', '.join(PLATFORMS)}")
    return platform


def group_rows(q: jax.Array, q_positions: jax.Array, kv_heads: int, n_rows: int):
    """q [b, t, heads, d] -> rows [b, kv_heads, n_rows, d] (row = token * group + head in
    group, padded to n_rows) and their positions [b, n_rows, 1] (padding rows: -1, which
    sees no key)."""
    batch, seq, heads, head_dim = q.shape
    group = heads // kv_heads
    rows = q.reshape(batch, seq, kv_heads, group, head_dim).transpose(0, 2, 1, 3, 4)
    rows = rows.reshape(batch, kv_heads, seq * group, head_dim)
    pad = n_rows - seq * group
    rows = jnp.pad(rows, ((0, 0), (0, 0), (0, pad), (0, 0)))
    row_pos = jnp.repeat(q_positions.astype(jnp.int32), group, axis=1)
    row_pos = jnp.pad(row_pos, ((0, 0), (0, pad)), constant_values=-1)
    return rows, row_pos[:, :, None]


def ungroup_rows(rows: jax.Array, seq: int, heads: int) -> jax.Array:
    """Inverse of `group_rows`: [b, kv_heads, n_rows, d] -> [b, seq, heads, d]."""
    batch, kv_heads, _, head_dim = rows.shape
    group = heads // kv_heads
    out = rows[:, :, : seq * group].reshape(batch, kv_heads, seq, group, head_dim)
    return out.transpose(0, 2, 1, 3, 4).reshape(batch, seq, heads, head_dim)


def block_meta(row_pos, kv_len, window, block_rows: int, block_kv: int) -> jax.Array:
    """[b, row_blocks, META] int32: for each block of rows, the KV blocks [first, end) that can
    hold a visible key, the row's kv length and the window."""
    batch, n_rows, _ = row_pos.shape
    pos = row_pos.reshape(batch, n_rows // block_rows, block_rows)
    top = jnp.max(pos, axis=-1)  # -1 when the block is all padding
    bottom = jnp.min(jnp.where(pos >= 0, pos, NO_WINDOW), axis=-1)
    end_key = jnp.minimum(top + 1, kv_len[:, None])
    first_key = jnp.maximum(bottom - window + 1, 0)
    end = -(-end_key // block_kv)
    first = jnp.minimum(first_key // block_kv, end)
    per_block = lambda x: jnp.broadcast_to(x, end.shape)  # noqa: E731
    return jnp.stack([first, end, per_block(kv_len[:, None]), per_block(window)], axis=-1).astype(
        jnp.int32
    )


def window_value(window: int | jax.Array | None) -> jax.Array:
    return jnp.asarray(NO_WINDOW if window is None else window, jnp.int32)


def next_power_of_2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


# ---------------------------------------------------------------------------- the kernels


def _loop_kernel(meta_ref, pos_ref, q_ref, k_ref, v_ref, o_ref, *, block_kv, scale, softcap,
                 upcast):
    """GPU driver: one program per (batch, kv_head, row block), looping over its KV blocks."""
    first, end, kv_len, window = meta_ref[0], meta_ref[1], meta_ref[2], meta_ref[3]
    q, row_pos = q_ref[...], pos_ref[...]

    def body(j, state):
        start = pl.multiple_of(j * block_kv, block_kv)
        k = k_ref[pl.ds(start, block_kv), :]
        v = v_ref[pl.ds(start, block_kv), :]
        mask = key_mask(row_pos, start, block_kv, kv_len, window, "gpu")
        return online_softmax_step(q, k, v, mask, *state, scale=scale, softcap=softcap,
                                   upcast=upcast)

    rows, head_dim = q.shape
    state = (
        jnp.full((rows, 1), MASK_VALUE, jnp.float32),
        jnp.zeros((rows, 1), jnp.float32),
        jnp.zeros((rows, head_dim), jnp.float32),
    )
    _, total, acc = jax.lax.fori_loop(first, end, body, state)
    o_ref[...] = finish(total, acc).astype(o_ref.dtype)


def _grid_kernel(
    meta_ref, pos_ref, q_ref, k_ref, v_ref, o_ref, m_ref, l_ref, acc_ref,
    *, block_kv, n_row_blocks, scale, softcap, upcast,
):
    """TPU driver: KV blocks are grid axis 3; the softmax state persists in VMEM scratch."""
    b, i, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)
    base = (b * n_row_blocks + i) * META
    first, end, kv_len, window = (meta_ref[base + n] for n in range(META))

    @pl.when(j == 0)
    def _init():
        m_ref[...] = jnp.full(m_ref.shape, MASK_VALUE, jnp.float32)
        l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)
        acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

    @pl.when((j >= first) & (j < end))
    def _step():
        start = j * block_kv
        mask = key_mask(pos_ref[...], start, block_kv, kv_len, window, "tpu")
        m, total, acc = online_softmax_step(
            q_ref[...], k_ref[...], v_ref[...], mask, m_ref[...], l_ref[...], acc_ref[...],
            scale=scale, softcap=softcap, upcast=upcast,
        )
        m_ref[...], l_ref[...], acc_ref[...] = m, total, acc

    @pl.when(j == pl.num_programs(3) - 1)
    def _write():
        o_ref[...] = finish(l_ref[...], acc_ref[...]).astype(o_ref.dtype)


def clamp_block(j, meta_ref, base):
    """The KV block to fetch at grid step j: j clamped into [first, end - 1], so the skipped
    steps repeat a block index and the pipeline issues no copy for them."""
    first, end = meta_ref[base], meta_ref[base + 1]
    return jnp.minimum(jnp.maximum(j, first), jnp.maximum(end - 1, first))


def default_blocks(platform: str, head_dim: int) -> tuple[int, int]:
    """(query rows, keys) per block: Triton tiles that fit registers/shared memory; on TPU
    128-lane score tiles."""
    if platform == "tpu":
        return 128, 128
    return (64, 64) if head_dim <= 128 else (32, 32)


def flash_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    q_positions: jax.Array,
    *,
    window: int | jax.Array | None = None,
    softcap: float | None = None,
    scale: float | None = None,
    kv_lengths: jax.Array | None = None,
    block_q: int | None = None,
    block_kv: int | None = None,
    platform: str | None = None,
    interpret: bool = False,
) -> jax.Array:
    """Causal GQA attention of queries against a dense cache; same contract as
    `reference.attention`.

    q: [batch, seq, heads, head_dim]; k, v: [batch, kv_heads, kv_len, head_dim];
    q_positions: [batch, seq]; window: int or traced int32 scalar (None: unlimited);
    softcap, scale: static floats. block_q counts query rows (tokens x heads of a group),
    block_kv keys; both powers of two >= 16 (defaults per platform; block_kv is halved while
    it does not divide kv_len, and the cache is padded only if 16 does not either).
    platform: "gpu" (Triton) or "tpu" (Mosaic), default the current backend's;
    interpret=True runs it on CPU.
    """
    batch, seq, heads, head_dim = q.shape
    _, kv_heads, kv_len, _ = k.shape
    check_shapes(q, kv_heads, k.shape[3])
    platform = check_platform(platform)
    default_q, default_kv = default_blocks(platform, head_dim)
    n_rows = seq * (heads // kv_heads)
    block_q, block_kv = block_q or default_q, block_kv or default_kv
    for name, size in (("block_q", block_q), ("block_kv", block_kv)):
        if size < 16 or size & (size - 1):
            raise ValueError(f"{name}={size}; it must be a power of two >= 16")
    # Short inputs get smaller blocks rather than padding.
    block_q = min(block_q, max(16, next_power_of_2(n_rows)))
    block_kv = min(block_kv, max(16, next_power_of_2(kv_len)))
    while block_kv > 16 and kv_len % block_kv:  # halve rather than pad (copy) the cache
        block_kv //= 2
    scale = head_dim**-0.5 if scale is None else float(scale)
    softcap = None if softcap is None else float(softcap)

    rows, row_pos = group_rows(q, q_positions, kv_heads, _round_up(n_rows, block_q))
    padded_len = _round_up(kv_len, block_kv)
    if padded_len != kv_len:  # keys past kv_len are masked by the lengths below
        k = jnp.pad(k, ((0, 0), (0, 0), (0, padded_len - kv_len), (0, 0)))
        v = jnp.pad(v, ((0, 0), (0, 0), (0, padded_len - kv_len), (0, 0)))
    lengths = jnp.full((batch,), kv_len, jnp.int32)
    if kv_lengths is not None:
        lengths = jnp.minimum(lengths, kv_lengths.astype(jnp.int32))
    meta = block_meta(row_pos, lengths, window_value(window), block_q, block_kv)
    n_row_blocks = rows.shape[2] // block_q
    out_shape = jax.ShapeDtypeStruct(rows.shape, q.dtype)
    run = _flash_tpu if platform == "tpu" else _flash_gpu
    out = run(
        meta, row_pos, rows, k, v, out_shape,
        block_q=block_q, block_kv=block_kv, n_row_blocks=n_row_blocks,
        scale=scale, softcap=softcap, interpret=interpret,
    )
    return ungroup_rows(out, seq, heads)


def _flash_gpu(meta, row_pos, rows, k, v, out_shape, *, block_q, block_kv, n_row_blocks,
               scale, softcap, interpret) -> jax.Array:
    from jax.experimental.pallas import triton as plgpu

    batch, kv_heads, _, head_dim = rows.shape
    kv_len = k.shape[2]
    kernel = functools.partial(_loop_kernel, block_kv=block_kv, scale=scale, softcap=softcap,
                               upcast=interpret)
    q_spec = pl.BlockSpec((None, None, block_q, head_dim), lambda b, h, i: (b, h, i, 0))
    kv_spec = pl.BlockSpec((None, None, kv_len, head_dim), lambda b, h, i: (b, h, 0, 0))
    return pl.pallas_call(
        kernel,
        grid=(batch, kv_heads, n_row_blocks),
        in_specs=[
            pl.BlockSpec((None, None, META), lambda b, h, i: (b, i, 0)),
            pl.BlockSpec((None, block_q, 1), lambda b, h, i: (b, i, 0)),
            q_spec, kv_spec, kv_spec,
        ],
        out_specs=q_spec,
        out_shape=out_shape,
        compiler_params=plgpu.CompilerParams(
            num_warps=4 if head_dim <= 64 else 8, num_stages=2
        ),
        interpret=interpret,
        name="flash_attention",
    )(meta, row_pos, rows, k, v)


def _flash_tpu(meta, row_pos, rows, k, v, out_shape, *, block_q, block_kv, n_row_blocks,
               scale, softcap, interpret) -> jax.Array:
    from jax.experimental.pallas import tpu as pltpu

    batch, kv_heads, _, head_dim = rows.shape
    n_kv_blocks = k.shape[2] // block_kv
    kernel = functools.partial(
        _grid_kernel, block_kv=block_kv, n_row_blocks=n_row_blocks, scale=scale, softcap=softcap,
        upcast=interpret,
    )

    def kv_index(b, h, i, j, meta_ref):
        return b, h, clamp_block(j, meta_ref, (b * n_row_blocks + i) * META), 0

    q_spec = pl.BlockSpec((None, None, block_q, head_dim), lambda b, h, i, j, m: (b, h, i, 0))
    kv_spec = pl.BlockSpec((None, None, block_kv, head_dim), kv_index)
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=1,
        grid=(batch, kv_heads, n_row_blocks, n_kv_blocks),
        in_specs=[
            pl.BlockSpec((None, block_q, 1), lambda b, h, i, j, m: (b, i, 0)),
            q_spec, kv_spec, kv_spec,
        ],
        out_specs=q_spec,
        scratch_shapes=[
            pltpu.VMEM((block_q, 1), jnp.float32),
            pltpu.VMEM((block_q, 1), jnp.float32),
            pltpu.VMEM((block_q, head_dim), jnp.float32),
        ],
    )
    return pl.pallas_call(
        kernel,
        grid_spec=grid_spec,
        out_shape=out_shape,
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")
        ),
        interpret=interpret,
        name="flash_attention",
    )(meta.reshape(-1), row_pos, rows, k, v)

