"""Blocked attention in plain XLA, the CPU path: the cache is read one block of KV_BLOCK
positions at a time, and only the blocks that some query of the batch can see (a loop bounded
by the batch's largest position), with an online softmax as in the Pallas kernels. So a decode
step costs with the tokens present, not the cache length allocated, and a causal prefill skips
the blocks above the diagonal. Masking and output as in `reference.attention`.

Batch invariance: blocks start at multiples of KV_BLOCK whatever the cache length, every key
sits at the same offset of its block, and a row with nothing visible in a block keeps its
softmax state untouched, so at a given batch size a row's result is bitwise independent of the
other rows' lengths and of the cache length allocated. Across batch sizes its last bits may
change: XLA:CPU hands reductions and dots to its own or to YNNPACK's kernels by shape.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

KV_BLOCK = 256  # cache positions per loop step
QUERY_CHUNK = 128  # queries per step of a long prefill: one chunk's fp32 scores stay in cache

# position indices [KV_BLOCK] (clipped to the cache) -> k, v blocks [batch, kv_heads, KV_BLOCK, d]
BlockReader = Callable[[jax.Array], tuple[jax.Array, jax.Array]]


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    q_positions: jax.Array,
    *,
    layer: int | jax.Array | None = None,
    scales: tuple[jax.Array, jax.Array] | None = None,
    **options,
) -> jax.Array:
    """`reference.attention` against a dense cache k, v [batch, kv_heads, max_len, head_dim],
    or [layers, ...] with `layer` (may be traced) picking one; the layer is read in place.
    An int8 cache comes with `scales` (k's, v's: k's shape without head_dim), and each block
    is dequantized as it is read."""
    k_scale, v_scale = (None, None) if scales is None else scales
    if layer is None:
        k, v, layer = k[None], v[None], 0
        k_scale, v_scale = (None, None) if scales is None else (k_scale[None], v_scale[None])

    def read(index: jax.Array) -> tuple[jax.Array, jax.Array]:
        def block(values, scale):  # one gather from the stacked cache: [n, b, kv, d]
            out = values[layer, :, :, index]
            out = out if scale is None else dequantize(out, scale[layer, :, :, index], q.dtype)
            return out.transpose(1, 2, 0, 3)  # [b, kv, n, d]
        return block(k, k_scale), block(v, v_scale)

    return _chunked_queries(q, read, k.shape[2], k.shape[3], q_positions, **options)


def paged_attention(
    q: jax.Array,
    k_pages: jax.Array,
    v_pages: jax.Array,
    page_table: jax.Array,
    q_positions: jax.Array,
    *,
    layer: int | jax.Array | None = None,
    scales: tuple[jax.Array, jax.Array] | None = None,
    **options,
) -> jax.Array:
    """`reference.paged_attention`; k_pages, v_pages: [kv_heads, num_pages, page_size, d], or
    [layers, ...] with `layer` picking one. Reads only the pages of the visible blocks; int8
    pages come with `scales` as in `attention`."""
    k_scale, v_scale = (None, None) if scales is None else scales
    if layer is None:
        k_pages, v_pages, layer = k_pages[None], v_pages[None], 0
        k_scale, v_scale = (None, None) if scales is None else (k_scale[None], v_scale[None])
    page_size = k_pages.shape[3]
    batch, pages_per_seq = page_table.shape

    def read(index: jax.Array) -> tuple[jax.Array, jax.Array]:
        # The pages holding these positions, [batch, n]; KV_BLOCK need not be a page multiple.
        pages = page_table[:, jnp.minimum(index // page_size, pages_per_seq - 1)]
        offsets = index % page_size

        def block(values, scale):  # [b, n, kv, d]
            out = values[layer, :, pages, offsets]
            out = out if scale is None else dequantize(out, scale[layer, :, pages, offsets],
                                                       q.dtype)
            return out.transpose(0, 2, 1, 3)  # [b, kv, n, d]
        return block(k_pages, k_scale), block(v_pages, v_scale)

    return _chunked_queries(q, read, k_pages.shape[1], pages_per_seq * page_size, q_positions,
                            **options)


def dequantize(values: jax.Array, scales: jax.Array, dtype) -> jax.Array:
    """int8 cache values [..., head_dim] times their per-token scales [...], in `dtype`."""
    return (values.astype(jnp.float32) * scales[..., None]).astype(dtype)


def _chunked_queries(q, read: BlockReader, kv_heads: int, kv_len: int, q_positions,
                     **options) -> jax.Array:
    """Up to QUERY_CHUNK queries in one go; more, a chunk at a time (padding queries at
    position -1 see nothing), each chunk looping over the blocks its own queries can see."""
    batch, seq, heads, head_dim = q.shape
    if seq <= QUERY_CHUNK:
        return _attend(q, read, kv_heads, kv_len, q_positions, **options)
    chunks = -(-seq // QUERY_CHUNK)
    pad = chunks * QUERY_CHUNK - seq
    q = jnp.pad(q, ((0, 0), (0, pad), (0, 0), (0, 0)))
    q_positions = jnp.pad(q_positions, ((0, 0), (0, pad)), constant_values=-1)
    q = q.reshape(batch, chunks, QUERY_CHUNK, heads, head_dim).swapaxes(0, 1)
    q_positions = q_positions.reshape(batch, chunks, QUERY_CHUNK).swapaxes(0, 1)
    out = jax.lax.map(lambda c: _attend(c[0], read, kv_heads, kv_len, c[1], **options),
                      (q, q_positions))
    return out.swapaxes(0, 1).reshape(batch, chunks * QUERY_CHUNK, heads, head_dim)[:, :seq]


def _attend(
    q: jax.Array,
    read: BlockReader,
    kv_heads: int,
    kv_len: int,
    q_positions: jax.Array,
    *,
    window: int | jax.Array | None = None,
    softcap: float | None = None,
    scale: float | None = None,
    kv_lengths: jax.Array | None = None,
    sinks: jax.Array | None = None,
) -> jax.Array:
    """The online softmax over the blocks [first, end) that hold a key visible to some query;
    `sinks` [heads]: a per-head logit in every softmax's denominator with no value (gpt-oss)."""
    batch, seq, heads, head_dim = q.shape
    scale = head_dim**-0.5 if scale is None else scale
    out_dtype = q.dtype
    compute = jnp.float32 if jax.default_backend() == "cpu" else q.dtype  # as in reference
    q = q.astype(compute)

    # The visible keys of the batch lie in [first_key, end_key).
    valid = q_positions >= 0
    end_key = jnp.minimum(jnp.max(q_positions) + 1, kv_len)
    if kv_lengths is not None:
        end_key = jnp.minimum(end_key, jnp.max(kv_lengths))
    first_key = 0
    if window is not None:
        lowest = jnp.min(jnp.where(valid, q_positions, jnp.iinfo(jnp.int32).max))
        first_key = jnp.maximum(lowest - window + 1, 0)
    first, end = first_key // KV_BLOCK, -(-end_key // KV_BLOCK)

    def step(block, state):
        best, total, acc = state  # [b, kv, g, t], [b, kv, g, t], [b, kv, g, t, d]
        index = block * KV_BLOCK + jnp.arange(KV_BLOCK)
        k, v = read(jnp.minimum(index, kv_len - 1))
        value_dtype = v.dtype
        k, v = k.astype(compute), v.astype(compute)
        scores = jnp.einsum("btkgd,bksd->bkgts", q, k, preferred_element_type=jnp.float32)
        if softcap is not None:
            scores = softcap * jnp.tanh(scores / softcap)
        j, p = index[None, None, :], q_positions[:, :, None]
        mask = (j <= p) & (j < kv_len)
        if window is not None:
            mask &= p - j < window
        if kv_lengths is not None:
            mask &= j < kv_lengths[:, None, None]
        scores = jnp.where(mask[:, None, None], scores, -jnp.inf)
        new_best = jnp.maximum(best, jnp.max(scores, axis=-1))
        shift = jnp.where(jnp.isfinite(new_best), new_best, 0.0)
        weights = jnp.exp(scores - shift[..., None])
        rescale = jnp.exp(best - shift)  # 0 while nothing was visible yet
        weights_v = weights.astype(value_dtype).astype(compute)  # rounded as in the kernels
        new_total = rescale * total + jnp.sum(weights, axis=-1)
        new_acc = rescale[..., None] * acc + jnp.einsum(
            "bkgts,bksd->bkgtd", weights_v, v, preferred_element_type=jnp.float32)
        # A row that sees nothing in this block keeps its state bit for bit.
        seen = jnp.any(mask, axis=-1)[:, None, None]  # [b, 1, 1, t]
        return (jnp.where(seen, new_best, best), jnp.where(seen, new_total, total),
                jnp.where(seen[..., None], new_acc, acc))

    q = (q * scale).reshape(batch, seq, kv_heads, heads // kv_heads, head_dim)
    shape = (batch, kv_heads, heads // kv_heads, seq)
    init = (jnp.full(shape, -jnp.inf, jnp.float32), jnp.zeros(shape, jnp.float32),
            jnp.zeros((*shape, head_dim), jnp.float32))
    best, total, acc = jax.lax.fori_loop(first, end, step, init)
    if sinks is not None:  # one more term in the denominator, exp(sink), on the same shift
        sink = sinks.astype(jnp.float32).reshape(kv_heads, heads // kv_heads)[None, :, :, None]
        shift = jnp.maximum(best, sink)
        rescale = jnp.exp(best - shift)
        total, acc = rescale * total + jnp.exp(sink - shift), rescale[..., None] * acc
    out = acc / jnp.where(total > 0, total, 1.0)[..., None]  # nothing visible: zeros
    return out.transpose(0, 3, 1, 2, 4).reshape(batch, seq, heads, head_dim).astype(out_dtype)


