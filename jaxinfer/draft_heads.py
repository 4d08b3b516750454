"""Draft heads: small trained blocks over the model's own final hidden state that propose the
tokens after the newest one, for speculative decoding (`speculative_method="draft"`).

Each head is Medusa's residual block (Cai et al. 2024, "Medusa: Simple LLM Inference
Acceleration Framework with Multiple Decoding Heads"), fed also the newest token's embedding
as in Hydra (Ankner et al. 2024), since the hidden state that drew a token does not know which
token was drawn. Head i reads, for a row whose newest token `last` was drawn from hidden state
u, the vector [u, embedding(last) / rms] and proposes the token i + 1 places after `last`:

    z_i = u + W_out[i] @ silu(W_in[i] @ [u, e]);   draft_i = argmax unembed(z_i)

through the model's own unembedding. Why heads, not an EAGLE layer or early-exit layers: they
need no KV cache and no model call of their own (u is what the verifying call computed
anyway), and on a memory-bound CPU step their k read-outs share one pass over the
unembedding matrix, the largest weight. W_out starts at zero, so an untrained head proposes
what the model would say after u again: `last` itself under greedy decoding.

    heads = init(jax.random.key(0), cfg.embed_dim, num_heads=4)
    draft = propose(heads, params, state.feature, state.last, k, cfg)  # [rows, k]

`jaxinfer.distill` trains them; `jaxinfer.checkpoints.draft` saves and loads them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxinfer.config import ModelConfig
from jaxinfer.models import family

Heads = dict[str, jax.Array]  # w_in [heads, 2 * embed, hidden], w_out [heads, hidden, embed]
MAX_HEADS = 7  # as many as speculative.MAX_SPECULATIVE_TOKENS


def init(key: jax.Array, embed_dim: int, num_heads: int = 4,
         hidden_dim: int | None = None) -> Heads:
    """Untrained heads (float32): W_in ~ N(0, 1 / fan_in), W_out = 0."""
    if not 1 <= num_heads <= MAX_HEADS:
        raise ValueError(f"num_heads={num_heads}; it must be in 1..{MAX_HEADS}")
    hidden_dim = hidden_dim or embed_dim
    w_in = jax.random.normal(key, (num_heads, 2 * embed_dim, hidden_dim), jnp.float32)
    return {"w_in": w_in / jnp.sqrt(2.0 * embed_dim),
            "w_out": jnp.zeros((num_heads, hidden_dim, embed_dim), jnp.float32)}


def num_heads(heads: Heads) -> int:
    return heads["w_in"].shape[0]


def hidden_states(heads: Heads, feature: jax.Array, embedding: jax.Array) -> jax.Array:
    """feature [rows, embed] (the final hidden state `last` was drawn from), embedding
    [rows, embed] (of `last`) -> each head's hidden state z [rows, heads, embed] (float32),
    for the model's unembedding to read out."""
    u = feature.astype(jnp.float32)
    e = embedding.astype(jnp.float32)
    e = e * jax.lax.rsqrt(jnp.mean(e * e, axis=-1, keepdims=True) + 1e-6)
    inner = jax.nn.silu(jnp.einsum("rc,ncd->rnd", jnp.concatenate([u, e], -1), heads["w_in"]))
    return u[:, None] + jnp.einsum("rnd,nde->rne", inner, heads["w_out"])


def propose(heads: Heads, params, feature: jax.Array, last: jax.Array, k: int,
            cfg: ModelConfig) -> jax.Array:
    """The first `k` heads' greedy proposals [rows, k] int32 for the tokens after `last`
    [rows], which was drawn from `feature` [rows, embed]."""
    model = family(cfg.architecture)
    embedding = model.embed(params, last[:, None], cfg)[:, 0]
    z = hidden_states(jax.tree.map(lambda w: w[:k], heads), feature, embedding)
    logits = model.unembed(params, z.astype(cfg.dtype), cfg)
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
