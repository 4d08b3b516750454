"""Llama family (Llama 2/3, SmolLM2, ...): RMSNorm, RoPE, grouped-query attention, SwiGLU.

Parameters are declared once, as Flax NNX Params carrying logical axis names; the model
itself is a pure function over the plain nested dict of arrays that `nnx.split` yields.
Per-layer weights are stacked on a leading `layers` axis and run with `jax.lax.scan`.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxinfer.cache import KVCache
from jaxinfer.config import DTYPES, ModelConfig
from jaxinfer.models.layers import apply_rope, rms_norm, rope, swiglu

Params = dict[str, Any]


def _param(rngs: nnx.Rngs, cfg: ModelConfig, shape, axes, init=None) -> nnx.Param:
    init = init or nnx.initializers.normal(0.02)
    value = init(rngs.params(), shape, DTYPES[cfg.param_dtype])
    return nnx.Param(value, sharding_names=axes, eager_sharding=False)


class Layers(nnx.Module):
    """All decoder layers' weights, stacked: each leads with the `layers` axis."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        L, D, H, K, Dh, F = (
            cfg.n_layers, cfg.embed_dim, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.mlp_dim
        )
        ones = nnx.initializers.ones
        self.attn_norm = _param(rngs, cfg, (L, D), ("layers", "embed"), ones)
        self.wq = _param(rngs, cfg, (L, D, H, Dh), ("layers", "embed", "heads", "head_dim"))
        self.wk = _param(rngs, cfg, (L, D, K, Dh), ("layers", "embed", "kv_heads", "head_dim"))
        self.wv = _param(rngs, cfg, (L, D, K, Dh), ("layers", "embed", "kv_heads", "head_dim"))
        self.wo = _param(rngs, cfg, (L, H, Dh, D), ("layers", "heads", "head_dim", "embed"))
        self.mlp_norm = _param(rngs, cfg, (L, D), ("layers", "embed"), ones)
        self.w_gate = _param(rngs, cfg, (L, D, F), ("layers", "embed", "mlp"))
        self.w_up = _param(rngs, cfg, (L, D, F), ("layers", "embed", "mlp"))
        self.w_down = _param(rngs, cfg, (L, F, D), ("layers", "mlp", "embed"))


class Llama(nnx.Module):
    """The parameter declaration. Use `init_params` / `abstract_params`, not this directly."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.embed = _param(rngs, cfg, (cfg.vocab_size, cfg.embed_dim), ("vocab", "embed"))
        self.layers = Layers(cfg, rngs)
        self.final_norm = _param(rngs, cfg, (cfg.embed_dim,), ("embed",), nnx.initializers.ones)
        if not cfg.tie_embeddings:
            shape = (cfg.vocab_size, cfg.embed_dim)
            self.lm_head = _param(rngs, cfg, shape, ("vocab", "embed"))


def init_params(cfg: ModelConfig, key: jax.Array) -> Params:
    """Random parameters (for tests and benchmarks), as a nested dict of arrays."""
    return nnx.split(Llama(cfg, nnx.Rngs(params=key)))[1].to_pure_dict()


def _abstract_state(cfg: ModelConfig) -> nnx.State:
    return nnx.split(nnx.eval_shape(lambda: Llama(cfg, nnx.Rngs(0))))[1]


def abstract_params(cfg: ModelConfig) -> Params:
    """ShapeDtypeStructs of every parameter, computed without allocating."""
    return _abstract_state(cfg).to_pure_dict()


def logical_axes(cfg: ModelConfig) -> Params:
    """The logical axis names of every parameter (a PartitionSpec of names per leaf)."""
    return nnx.get_partition_spec(_abstract_state(cfg)).to_pure_dict()


def decoder_layer(
    x: jax.Array,
    layer: Params,
    index: jax.Array,
    cache: KVCache,
    positions: jax.Array,
    rope_tables: tuple[jax.Array, jax.Array],
    cfg: ModelConfig,
) -> tuple[jax.Array, KVCache]:
    """One pre-norm block: x + attention(norm(x)), then + mlp(norm(x)); writes its K/V."""
    cos, sin = rope_tables
    h = rms_norm(x, layer["attn_norm"], cfg.rms_eps)
    q = apply_rope(jnp.einsum("btd,dhk->bthk", h, layer["wq"]), cos, sin)
    k = apply_rope(jnp.einsum("btd,dhk->bthk", h, layer["wk"]), cos, sin)
    v = jnp.einsum("btd,dhk->bthk", h, layer["wv"])
    cache = cache.update(index, positions, k, v)
    attn = cache.attend(index, q, positions, impl=cfg.attention)
    x = x + jnp.einsum("bthk,hkd->btd", attn, layer["wo"])
    h = rms_norm(x, layer["mlp_norm"], cfg.rms_eps)
    return x + swiglu(h, layer["w_gate"], layer["w_up"], layer["w_down"]), cache


def transformer(
    params: Params, tokens: jax.Array, positions: jax.Array, cache: KVCache, cfg: ModelConfig
) -> tuple[jax.Array, KVCache]:
    """tokens, positions: [batch, seq] -> final hidden states [batch, seq, embed], new cache."""
    params = jax.tree.map(lambda p: p.astype(cfg.dtype), params)  # no-op when dtypes match
    x = params["embed"][tokens]
    rope_tables = rope(positions, cfg.head_dim, cfg.rope_theta, cfg.rope_freq_factors)

    def step(carry, layer_and_index):
        x, cache = carry
        layer, index = layer_and_index
        return decoder_layer(x, layer, index, cache, positions, rope_tables, cfg), None

    layer_ids = jnp.arange(cfg.n_layers)
    (x, cache), _ = jax.lax.scan(step, (x, cache), (params["layers"], layer_ids))
    return rms_norm(x, params["final_norm"], cfg.rms_eps), cache


def unembed(params: Params, hidden: jax.Array, cfg: ModelConfig) -> jax.Array:
    """hidden [..., embed] -> fp32 logits [..., vocab]."""
    head = params["embed"] if cfg.tie_embeddings else params["lm_head"]
    return jnp.einsum(
        "...d,vd->...v", hidden, head.astype(cfg.dtype), preferred_element_type=jnp.float32
    )


def forward(
    params: Params, tokens: jax.Array, positions: jax.Array, cache: KVCache, cfg: ModelConfig
) -> tuple[jax.Array, KVCache]:
    """Logits [batch, seq, vocab] (fp32) for every token, and the cache with them written."""
    hidden, cache = transformer(params, tokens, positions, cache, cfg)
    return unembed(params, hidden, cfg), cache
