"""The decoder-only transformer of the Llama lineage, with each family's quirks as config data.

Llama 2/3, SmolLM2, Mistral, Qwen2/2.5, Qwen3 and Gemma 3 text models are one block:
x + attention(norm(x)), then x + mlp(norm(x)), with RoPE and grouped-query attention. What
differs is data in the ModelConfig: q/k/v biases, q/k norms, (1 + w) norms, a scaled
embedding, GELU-tanh instead of SiLU, norms on the block outputs, per-layer sliding windows and
rope bases, the attention scale and logit soft-capping.

Parameters are declared once, as Flax NNX Params carrying logical axis names; the model
itself is a pure function over the plain nested dict of arrays that `nnx.split` yields.
Per-layer weights are stacked on a leading `layers` axis and run with `jax.lax.scan`, with
each layer's window and rotary frequencies scanned alongside as data.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxinfer.cache import KVCache
from jaxinfer.config import DTYPES, ModelConfig
from jaxinfer.kernels import cpu
from jaxinfer.models import moe
from jaxinfer.models.layers import (
    apply_rope,
    gated_mlp,
    inv_frequencies,
    rms_norm,
    rope_tables,
    softcap,
)
from jaxinfer.pallas.flash_attention import NO_WINDOW  # global layers' window
from jaxinfer.quant import cpu_kernels  # weights the CPU kernels read in place
from jaxinfer.quant import qarray as quant  # the products only: quantizers sit above
from jaxinfer.sharding.rules import constrain

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
        # A norm scales by (offset + w): start every norm at a scale of one.
        unit = nnx.initializers.zeros if cfg.norm_offset == 1.0 else nnx.initializers.ones
        self.attn_norm = _param(rngs, cfg, (L, D), ("layers", "embed"), unit)
        self.wq = _param(rngs, cfg, (L, D, H, Dh), ("layers", "embed", "heads", "head_dim"))
        self.wk = _param(rngs, cfg, (L, D, K, Dh), ("layers", "embed", "kv_heads", "head_dim"))
        self.wv = _param(rngs, cfg, (L, D, K, Dh), ("layers", "embed", "kv_heads", "head_dim"))
        if cfg.qkv_bias:
            self.bq = _param(rngs, cfg, (L, H, Dh), ("layers", "heads", "head_dim"))
            self.bk = _param(rngs, cfg, (L, K, Dh), ("layers", "kv_heads", "head_dim"))
            self.bv = _param(rngs, cfg, (L, K, Dh), ("layers", "kv_heads", "head_dim"))
        if cfg.qk_norm:
            self.q_norm = _param(rngs, cfg, (L, Dh), ("layers", "head_dim"), unit)
            self.k_norm = _param(rngs, cfg, (L, Dh), ("layers", "head_dim"), unit)
        self.wo = _param(rngs, cfg, (L, H, Dh, D), ("layers", "heads", "head_dim", "embed"))
        if cfg.o_bias:
            self.bo = _param(rngs, cfg, (L, D), ("layers", "embed"))
        if cfg.attn_sinks:
            self.sinks = _param(rngs, cfg, (L, H), ("layers", "heads"))
        if cfg.post_norms:
            self.post_attn_norm = _param(rngs, cfg, (L, D), ("layers", "embed"), unit)
            self.post_mlp_norm = _param(rngs, cfg, (L, D), ("layers", "embed"), unit)
        self.mlp_norm = _param(rngs, cfg, (L, D), ("layers", "embed"), unit)
        if cfg.n_experts:  # a mixture of experts in place of the dense MLP
            for name, (shape, axes) in moe.declarations(cfg).items():
                setattr(self, name, _param(rngs, cfg, shape, axes))
            return
        self.w_gate = _param(rngs, cfg, (L, D, F), ("layers", "embed", "mlp"))
        self.w_up = _param(rngs, cfg, (L, D, F), ("layers", "embed", "mlp"))
        self.w_down = _param(rngs, cfg, (L, F, D), ("layers", "mlp", "embed"))


class Llama(nnx.Module):
    """The parameter declaration. Use `init_params` / `abstract_params`, not this directly."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        unit = nnx.initializers.zeros if cfg.norm_offset == 1.0 else nnx.initializers.ones
        self.embed = _param(rngs, cfg, (cfg.vocab_size, cfg.embed_dim), ("vocab", "embed"))
        self.layers = Layers(cfg, rngs)
        self.final_norm = _param(rngs, cfg, (cfg.embed_dim,), ("embed",), unit)
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


def layer_data(cfg: ModelConfig) -> dict[str, np.ndarray]:
    """What differs between layers besides weights, stacked on the `layers` axis for scan:
    `window` [layers] (int32; only when some layer slides) and `inv_freq` [layers, head_dim/2].
    """
    windows = cfg.layer_windows()
    global_rope = inv_frequencies(cfg.head_dim, cfg.rope_theta, cfg.rope_freq_factors)
    local_rope = (
        global_rope if cfg.rope_local_theta is None
        else inv_frequencies(cfg.head_dim, cfg.rope_local_theta)
    )
    data = {"inv_freq": np.stack([global_rope if w is None else local_rope for w in windows])}
    if any(w is not None for w in windows):
        data["window"] = np.array([NO_WINDOW if w is None else w for w in windows], np.int32)
    return data


def _project(h: jax.Array, w: jax.Array, b: jax.Array | None) -> jax.Array:
    out = quant.einsum("btd,dhk->bthk", h, w)
    return out if b is None else out + b


def decoder_layer(
    x: jax.Array,
    layer: Params,
    index: jax.Array,
    cache: KVCache,
    positions: jax.Array,
    data: dict[str, jax.Array],
    cfg: ModelConfig,
) -> tuple[jax.Array, KVCache]:
    """One pre-norm block: x + attention(norm(x)), then + mlp(norm(x)); writes its K/V.

    `data` holds this layer's slice of `layer_data`: its rotary frequencies and window.
    """
    eps, offset = cfg.rms_eps, cfg.norm_offset
    cos, sin = rope_tables(positions, data["inv_freq"])
    if cfg.rope_attention_factor != 1.0:
        cos, sin = cos * cfg.rope_attention_factor, sin * cfg.rope_attention_factor
    h = rms_norm(x, layer["attn_norm"], eps, offset)
    q = _project(h, layer["wq"], layer.get("bq"))
    k = _project(h, layer["wk"], layer.get("bk"))
    v = _project(h, layer["wv"], layer.get("bv"))
    if cfg.qk_norm:
        q = rms_norm(q, layer["q_norm"], eps, offset)
        k = rms_norm(k, layer["k_norm"], eps, offset)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    cache = cache.update(index, positions, k, v)
    scale = None if cfg.query_pre_attn_scalar is None else cfg.query_pre_attn_scalar**-0.5
    sinks = {"sinks": layer["sinks"]} if cfg.attn_sinks else {}
    impl = cfg.attention  # cpu_kernels "off" keeps "auto" off the CPU kernel too
    if impl == "auto" and cfg.cpu_kernels == "off" and jax.default_backend() == "cpu":
        impl = "xla"
    attn = cache.attend(index, q, positions, window=data.get("window"),
                        softcap=cfg.attn_softcap, scale=scale, impl=impl,
                        batch_invariant=cfg.batch_invariant, **sinks)
    out = quant.einsum("bthk,hkd->btd", attn, layer["wo"])
    if cfg.o_bias:
        out = out + layer["bo"]
    if cfg.post_norms:
        out = rms_norm(out, layer["post_attn_norm"], eps, offset)
    x = x + out
    h = rms_norm(x, layer["mlp_norm"], eps, offset)
    if cfg.n_experts:
        out = moe.moe_mlp(h, layer, cfg)
    else:
        out = gated_mlp(h, layer["w_gate"], layer["w_up"], layer["w_down"], cfg.mlp_activation)
    if cfg.post_norms:
        out = rms_norm(out, layer["post_mlp_norm"], eps, offset)
    return x + out, cache


def _max_rows(cfg: ModelConfig) -> int | None:
    """The most rows a product runs on the CPU kernels with (None: all, batch_invariant)."""
    return None if cfg.batch_invariant else cpu.MAX_ROWS


def embed(params: Params, tokens: jax.Array, cfg: ModelConfig) -> jax.Array:
    """tokens [batch, seq] -> embeddings [batch, seq, embed] in the compute dtype."""
    x = quant.take(params["embed"], tokens, cfg.dtype)
    if cfg.embed_scale != 1.0:  # Gemma rounds the scale to the compute dtype first
        x = x * jnp.asarray(cfg.embed_scale, cfg.dtype)
    return x


def transformer(
    params: Params, tokens: jax.Array, positions: jax.Array, cache: KVCache, cfg: ModelConfig
) -> tuple[jax.Array, KVCache]:
    """tokens, positions: [batch, seq] -> final hidden states [batch, seq, embed], new cache."""
    # No-op when dtypes match; quantized weights keep their integer values.
    params = jax.tree.map(lambda p: p.astype(cfg.dtype), params, is_leaf=quant.keeps_structure)
    x = embed(params, tokens, cfg)
    # Weights the CPU kernels read in place stay whole (a scanned slice would be copied).
    whole, sliced = cpu_kernels.split_stacked(params["layers"], cfg.cpu_kernels)

    def step(carry, layer_and_index):
        x, cache = carry
        layer, data, index = layer_and_index
        layer = {**layer, **cpu_kernels.layer_views(whole, index, cfg.cpu_kernels,
                                                     _max_rows(cfg))}
        x = constrain(x)  # under a mesh: the residual stream is [batch -> data] between layers
        return decoder_layer(x, layer, index, cache, positions, data, cfg), None

    xs = (sliced, layer_data(cfg), jnp.arange(cfg.n_layers))
    (x, cache), _ = jax.lax.scan(step, (x, cache), xs)
    return rms_norm(x, params["final_norm"], cfg.rms_eps, cfg.norm_offset), cache


def unembed(params: Params, hidden: jax.Array, cfg: ModelConfig) -> jax.Array:
    """hidden [..., embed] -> fp32 logits [..., vocab] (soft-capped when the config says so)."""
    head = params["embed"] if cfg.tie_embeddings else params["lm_head"]
    head = cpu_kernels.in_place(head, cfg.cpu_kernels, _max_rows(cfg))
    logits = quant.einsum("...d,vd->...v", hidden, head, jnp.float32)
    return softcap(logits, cfg.final_softcap)


def forward(
    params: Params, tokens: jax.Array, positions: jax.Array, cache: KVCache, cfg: ModelConfig
) -> tuple[jax.Array, KVCache]:
    """Logits [batch, seq, vocab] (fp32) for every token, and the cache with them written."""
    hidden, cache = transformer(params, tokens, positions, cache, cfg)
    return unembed(params, hidden, cfg), cache
