"""Paged decode attention: a few new query tokens per row against a paged KV cache.

The cache is a pool of pages, k_pages/v_pages [layers, kv_heads, num_pages, page_size, d],
and a page table [batch, pages_per_seq]: key slot j of row b lives in page
page_table[b, j // page_size] at offset j % page_size. Rows are ragged: each has its own
length (by default one past its newest query position), and only the pages that can hold a
visible key are read. Query rows are regrouped as in `flash_attention` (tokens x heads of a
grouped-query group share each page read); masking, soft-capping and the fp32 online softmax
are the same code.

Each step folds one block of `block_kv` keys = block_kv / page_size pages:
- "gpu" (Triton lowering): one program per (batch, kv_head) loops over its blocks and
  gathers the block's pages from the pool with one indexed load.
- "tpu" (Mosaic lowering): blocks are the last, sequential grid axis; the page table, lengths
  and layer are scalar-prefetched into SMEM and each page of the block has its own BlockSpec
  whose index map looks the page up, so the pipeline DMAs exactly the row's pages.
The layer and the sliding window are traced scalars (scanned with the layers), never static.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from jaxinfer.pallas.flash_attention import (
    MASK_VALUE,
    META,
    block_meta,
    check_platform,
    check_shapes,
    clamp_block,
    finish,
    group_rows,
    key_mask,
    next_power_of_2,
    online_softmax_step,
    ungroup_rows,
    window_value,
)

DEFAULT_BLOCK_KV = 128


def paged_attention(
    q: jax.Array,
    k_pages: jax.Array,
    v_pages: jax.Array,
    page_table: jax.Array,
    q_positions: jax.Array,
    *,
    layer: int | jax.Array | None = None,
    window: int | jax.Array | None = None,
    softcap: float | None = None,
    scale: float | None = None,
    kv_lengths: jax.Array | None = None,
    block_kv: int | None = None,
    platform: str | None = None,
    interpret: bool = False,
) -> jax.Array:
    """Same contract as `reference.paged_attention`.

    q: [batch, seq, heads, head_dim] (seq small: decode, or a few speculative tokens);
    k_pages, v_pages: [layers, kv_heads, num_pages, page_size, head_dim] with `layer` a
    (traced) index, or [kv_heads, num_pages, page_size, head_dim]; page_table:
    [batch, pages_per_seq] int32; q_positions: [batch, seq]. kv_lengths: [batch], default
    max(q_positions) + 1 per row. block_kv: keys per step, a multiple of page_size (default:
    the largest multiple of page_size up to 128, or page_size if larger). platform: "gpu"
    (Triton) or "tpu" (Mosaic), default the current backend's; interpret=True runs on CPU.
    """
    if k_pages.ndim == 4:
        k_pages, v_pages, layer = k_pages[None], v_pages[None], 0
    if k_pages.ndim != 5 or layer is None:
        raise ValueError(
            f"k_pages has shape {k_pages.shape}; expected [layers, kv_heads, num_pages, "
            "page_size, head_dim] with layer=, or [kv_heads, num_pages, page_size, head_dim]"
        )
    batch, seq, heads, head_dim = q.shape
    n_layers, kv_heads, num_pages, page_size, _ = k_pages.shape
    check_shapes(q, kv_heads, k_pages.shape[4])
    platform = check_platform(platform)
    block_kv = block_kv or page_size * max(1, DEFAULT_BLOCK_KV // page_size)
    if block_kv % page_size:
        raise ValueError(
            f"page_size={page_size} does not divide block_kv={block_kv}; a block must hold "
            "whole pages"
        )
    pages_per_block = block_kv // page_size
    if platform == "gpu" and (block_kv < 16 or block_kv & (block_kv - 1)):
        raise ValueError(
            f"block_kv={block_kv} (page_size={page_size} x {pages_per_block} pages); the GPU "
            "kernel needs a power of two >= 16"
        )
    scale = head_dim**-0.5 if scale is None else float(scale)
    softcap = None if softcap is None else float(softcap)

    n_rows = max(16, next_power_of_2(seq * (heads // kv_heads)))
    rows, row_pos = group_rows(q, q_positions, kv_heads, n_rows)
    pages_per_seq = page_table.shape[1]
    lengths = jnp.clip(jnp.max(q_positions, axis=1) + 1, 0, pages_per_seq * page_size)
    if kv_lengths is not None:
        lengths = jnp.minimum(lengths, kv_lengths)
    meta = block_meta(row_pos, lengths.astype(jnp.int32), window_value(window), n_rows, block_kv)
    n_blocks = -(-pages_per_seq // pages_per_block)
    if platform == "gpu":  # Triton blocks are powers of two
        n_blocks = next_power_of_2(n_blocks)
    table = jnp.pad(page_table.astype(jnp.int32),
                    ((0, 0), (0, n_blocks * pages_per_block - pages_per_seq)))
    layer = jnp.asarray(layer, jnp.int32).reshape(1)
    out_shape = jax.ShapeDtypeStruct(rows.shape, q.dtype)
    options = dict(pages_per_block=pages_per_block, scale=scale, softcap=softcap,
                   interpret=interpret)
    if platform == "tpu":
        out = _paged_tpu(meta.reshape(-1), layer, table, row_pos, rows, k_pages, v_pages,
                         out_shape, **options)
    else:
        flat_k = k_pages.reshape(n_layers * kv_heads * num_pages, page_size, head_dim)
        flat_v = v_pages.reshape(n_layers * kv_heads * num_pages, page_size, head_dim)
        out = _paged_gpu(meta.reshape(batch, META), layer, table, row_pos, rows, flat_k, flat_v,
                         out_shape, num_pages=num_pages, **options)
    return ungroup_rows(out, seq, heads)


def _loop_kernel(meta_ref, layer_ref, table_ref, pos_ref, q_ref, k_ref, v_ref, o_ref,
                 *, kv_heads, num_pages, pages_per_block, scale, softcap, upcast):
    """GPU driver: one program per (batch, kv_head) loops over the row's blocks of pages."""
    first, end, kv_len, window = meta_ref[0], meta_ref[1], meta_ref[2], meta_ref[3]
    # The pools are flattened to [layers * kv_heads * num_pages, page_size, d].
    base = (layer_ref[0] * kv_heads + pl.program_id(1)) * num_pages
    q, row_pos = q_ref[...], pos_ref[...]
    rows, head_dim = q.shape
    page_size = k_ref.shape[1]
    block_kv = pages_per_block * page_size

    def body(j, state):
        pages = table_ref[pl.ds(j * pages_per_block, pages_per_block)] + base
        k = k_ref[pages].reshape(block_kv, head_dim)
        v = v_ref[pages].reshape(block_kv, head_dim)
        mask = key_mask(row_pos, j * block_kv, block_kv, kv_len, window, "gpu")
        return online_softmax_step(q, k, v, mask, *state, scale=scale, softcap=softcap,
                                   upcast=upcast)

    state = (
        jnp.full((rows, 1), MASK_VALUE, jnp.float32),
        jnp.zeros((rows, 1), jnp.float32),
        jnp.zeros((rows, head_dim), jnp.float32),
    )
    _, total, acc = jax.lax.fori_loop(first, end, body, state)
    o_ref[...] = finish(total, acc).astype(o_ref.dtype)


def _paged_gpu(meta, layer, table, row_pos, rows, flat_k, flat_v, out_shape, *, num_pages,
               pages_per_block, scale, softcap, interpret) -> jax.Array:
    from jax.experimental.pallas import triton as plgpu

    batch, kv_heads, n_rows, head_dim = rows.shape
    kernel = functools.partial(
        _loop_kernel, kv_heads=kv_heads, num_pages=num_pages, pages_per_block=pages_per_block,
        scale=scale, softcap=softcap, upcast=interpret,
    )
    q_spec = pl.BlockSpec((None, None, n_rows, head_dim), lambda b, h: (b, h, 0, 0))
    pool_spec = pl.BlockSpec(flat_k.shape, lambda b, h: (0, 0, 0))  # gathered in the kernel
    return pl.pallas_call(
        kernel,
        grid=(batch, kv_heads),
        in_specs=[
            pl.BlockSpec((None, META), lambda b, h: (b, 0)),
            pl.BlockSpec((1,), lambda b, h: (0,)),
            pl.BlockSpec((None, table.shape[1]), lambda b, h: (b, 0)),
            pl.BlockSpec((None, n_rows, 1), lambda b, h: (b, 0, 0)),
            q_spec, pool_spec, pool_spec,
        ],
        out_specs=q_spec,
        out_shape=out_shape,
        compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=2),
        interpret=interpret,
        name="paged_attention",
    )(meta, layer, table, row_pos, rows, flat_k, flat_v)


def _grid_kernel(meta_ref, layer_ref, table_ref, pos_ref, q_ref, *refs,
                 pages_per_block, scale, softcap, upcast):
    """TPU driver: blocks of pages are grid axis 2; each page of a block is its own input."""
    k_refs, v_refs = refs[:pages_per_block], refs[pages_per_block:2 * pages_per_block]
    o_ref, m_ref, l_ref, acc_ref = refs[2 * pages_per_block:]
    b, j = pl.program_id(0), pl.program_id(2)
    first, end, kv_len, window = (meta_ref[b * META + n] for n in range(META))
    page_size = k_refs[0].shape[0]
    block_kv = pages_per_block * page_size

    @pl.when(j == 0)
    def _init():
        m_ref[...] = jnp.full(m_ref.shape, MASK_VALUE, jnp.float32)
        l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)
        acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

    @pl.when((j >= first) & (j < end))
    def _step():
        k = jnp.concatenate([r[...] for r in k_refs], axis=0)
        v = jnp.concatenate([r[...] for r in v_refs], axis=0)
        mask = key_mask(pos_ref[...], j * block_kv, block_kv, kv_len, window, "tpu")
        m, total, acc = online_softmax_step(
            q_ref[...], k, v, mask, m_ref[...], l_ref[...], acc_ref[...],
            scale=scale, softcap=softcap, upcast=upcast,
        )
        m_ref[...], l_ref[...], acc_ref[...] = m, total, acc

    @pl.when(j == pl.num_programs(2) - 1)
    def _write():
        o_ref[...] = finish(l_ref[...], acc_ref[...]).astype(o_ref.dtype)


def _paged_tpu(meta, layer, table, row_pos, rows, k_pages, v_pages, out_shape, *,
               pages_per_block, scale, softcap, interpret) -> jax.Array:
    from jax.experimental.pallas import tpu as pltpu

    batch, kv_heads, n_rows, head_dim = rows.shape
    page_size = k_pages.shape[3]
    table_width = table.shape[1]
    n_blocks = table_width // pages_per_block

    def page_spec(n):
        def index(b, h, j, meta_ref, layer_ref, table_ref):
            block = clamp_block(j, meta_ref, b * META)
            return layer_ref[0], h, table_ref[b * table_width + block * pages_per_block + n], 0, 0

        return pl.BlockSpec((None, None, None, page_size, head_dim), index)

    page_specs = [page_spec(n) for n in range(pages_per_block)]
    q_spec = pl.BlockSpec((None, None, n_rows, head_dim), lambda b, h, j, *_: (b, h, 0, 0))
    kernel = functools.partial(
        _grid_kernel, pages_per_block=pages_per_block, scale=scale, softcap=softcap,
        upcast=interpret,
    )
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=3,
        grid=(batch, kv_heads, n_blocks),
        in_specs=[pl.BlockSpec((None, n_rows, 1), lambda b, h, j, *_: (b, 0, 0)), q_spec,
                  *page_specs, *page_specs],
        out_specs=q_spec,
        scratch_shapes=[
            pltpu.VMEM((n_rows, 1), jnp.float32),
            pltpu.VMEM((n_rows, 1), jnp.float32),
            pltpu.VMEM((n_rows, head_dim), jnp.float32),
        ],
    )
    return pl.pallas_call(
        kernel,
        grid_spec=grid_spec,
        out_shape=out_shape,
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "arbitrary")
        ),
        interpret=interpret,
        name="paged_attention",
    )(meta, layer, table.reshape(-1), row_pos, rows,
      *[k_pages] * pages_per_block, *[v_pages] * pages_per_block)
