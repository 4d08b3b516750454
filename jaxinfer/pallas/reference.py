"""Plain-jnp attention: the numerical reference for the Pallas kernels and the CPU path."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def visible(
    q_positions: jax.Array,
    kv_len: int,
    window: int | jax.Array | None = None,
    kv_lengths: jax.Array | None = None,
) -> jax.Array:
    """[batch, seq, kv_len] mask: key slot j is visible to a query at position p iff
    j <= p, p - j < window (sliding-window attention; None: unlimited), and j < kv_lengths[b].
    """
    j = jnp.arange(kv_len)[None, None, :]
    p = q_positions[:, :, None]
    mask = j <= p
    if window is not None:
        mask &= p - j < window
    if kv_lengths is not None:
        mask &= j < kv_lengths[:, None, None]
    return mask


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    q_positions: jax.Array,
    *,
    window: int | jax.Array | None = None,
    softcap: float | None = None,
    scale: float | None = None,
    kv_lengths: jax.Array | None = None,
) -> jax.Array:
    """Causal grouped-query attention of new queries against a dense KV cache.

    q: [batch, seq, heads, head_dim]; k, v: [batch, kv_heads, max_len, head_dim];
    q_positions: [batch, seq]; masking as in `visible`. Scores are `q.k * scale` (default
    head_dim**-0.5), soft-capped to `softcap * tanh(s / softcap)` when given. A query with no
    visible key gets zeros. Returns [batch, seq, heads, head_dim] in q's dtype; scores and
    softmax run in fp32.
    """
    batch, seq, heads, head_dim = q.shape
    kv_heads, max_len = k.shape[1], k.shape[2]
    scale = head_dim**-0.5 if scale is None else scale
    out_dtype, value_dtype = q.dtype, v.dtype
    if jax.default_backend() == "cpu" and jnp.bfloat16 in (q.dtype, k.dtype, v.dtype):
        # XLA:CPU lacks some bf16 x bf16 -> fp32 dots; bf16 products are exact in fp32.
        q, k, v = q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32)
    q = q.reshape(batch, seq, kv_heads, heads // kv_heads, head_dim)
    scores = jnp.einsum("btkgd,bksd->bkgts", q, k, preferred_element_type=jnp.float32)
    scores = scores * scale
    if softcap is not None:
        scores = softcap * jnp.tanh(scores / softcap)
    mask = visible(q_positions, max_len, window, kv_lengths)[:, None, None]  # [b, 1, 1, t, s]
    scores = jnp.where(mask, scores, -jnp.inf)
    # Rows with nothing visible would be NaN after softmax; give them zeros instead.
    top = jnp.max(scores, axis=-1, keepdims=True)
    top = jnp.where(jnp.isfinite(top), top, 0.0)
    weights = jnp.exp(scores - top)
    total = jnp.sum(weights, axis=-1, keepdims=True)
    # Probabilities are rounded to the value dtype before the PV product, as in the kernels.
    probs = (weights / jnp.where(total > 0, total, 1.0)).astype(value_dtype).astype(v.dtype)
    out = jnp.einsum("bkgts,bksd->btkgd", probs, v, preferred_element_type=jnp.float32)
    return out.reshape(batch, seq, heads, head_dim).astype(out_dtype)


def gather_pages(pages: jax.Array, page_table: jax.Array) -> jax.Array:
    """A dense view of each row's pages: pages [kv_heads, num_pages, page_size, head_dim],
    page_table [batch, pages_per_seq] -> [batch, kv_heads, pages_per_seq * page_size, head_dim]."""
    kv_heads, _, page_size, head_dim = pages.shape
    batch, pages_per_seq = page_table.shape
    dense = jnp.moveaxis(pages[:, page_table], 1, 0)  # [batch, kv, pages_per_seq, page, d]
    return dense.reshape(batch, kv_heads, pages_per_seq * page_size, head_dim)


def paged_attention(
    q: jax.Array,
    k_pages: jax.Array,
    v_pages: jax.Array,
    page_table: jax.Array,
    q_positions: jax.Array,
    *,
    window: int | jax.Array | None = None,
    softcap: float | None = None,
    scale: float | None = None,
    kv_lengths: jax.Array | None = None,
) -> jax.Array:
    """`attention` against a paged cache: key slot j of row b lives in page
    page_table[b, j // page_size] at offset j % page_size.

    q: [batch, seq, heads, head_dim]; k_pages, v_pages: [kv_heads, num_pages, page_size,
    head_dim]; page_table: [batch, pages_per_seq] int32; masking and output as in `attention`.
    """
    k = gather_pages(k_pages, page_table)
    v = gather_pages(v_pages, page_table)
    return attention(
        q, k, v, q_positions, window=window, softcap=softcap, scale=scale, kv_lengths=kv_lengths
    )
