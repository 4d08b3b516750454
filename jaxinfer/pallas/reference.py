"""Plain-jnp attention: the numerical reference for the Pallas kernels and the CPU path."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def attention(
    q: jax.Array, k: jax.Array, v: jax.Array, q_positions: jax.Array
) -> jax.Array:
    """Causal grouped-query attention of new queries against a dense KV cache.

    q: [batch, seq, heads, head_dim]; k, v: [batch, kv_heads, max_len, head_dim];
    q_positions: [batch, seq]. Key slot j is visible to a query at position p iff j <= p.
    Returns [batch, seq, heads, head_dim] in q's dtype; scores and softmax run in fp32.
    """
    batch, seq, heads, head_dim = q.shape
    kv_heads, max_len = k.shape[1], k.shape[2]
    q = q.reshape(batch, seq, kv_heads, heads // kv_heads, head_dim)
    scores = jnp.einsum("btkgd,bksd->bkgts", q, k, preferred_element_type=jnp.float32)
    scores = scores * head_dim**-0.5
    visible = jnp.arange(max_len)[None, None, :] <= q_positions[:, :, None]  # [b, t, s]
    scores = jnp.where(visible[:, None, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bksd->btkgd", probs, v, preferred_element_type=jnp.float32)
    return out.reshape(batch, seq, heads, head_dim).astype(q.dtype)
