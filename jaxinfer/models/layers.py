"""Building blocks shared by model families: norms, rotary embeddings, gated MLPs."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """RMSNorm in fp32, cast back to the input dtype before scaling (as Hugging Face does)."""
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return weight.astype(x.dtype) * normed.astype(x.dtype)


def rope(
    positions: jax.Array, head_dim: int, theta: float, freq_factors: tuple[float, ...] | None = None
) -> tuple[jax.Array, jax.Array]:
    """cos, sin tables for `positions: [batch, seq]`, each [batch, seq, head_dim], in fp32.

    `freq_factors` ([head_dim / 2]) divide the frequencies, as llama.cpp's rope_freqs tensor.
    """
    inv_freq = 1.0 / theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)
    if freq_factors is not None:
        inv_freq = inv_freq / jnp.asarray(freq_factors, jnp.float32)
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [batch, seq, head_dim / 2]
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotates `x: [batch, seq, heads, head_dim]` in the half-split (rotate_half) layout."""
    x32 = x.astype(jnp.float32)
    x1, x2 = jnp.split(x32, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    out = x32 * cos[:, :, None, :] + rotated * sin[:, :, None, :]
    return out.astype(x.dtype)


def swiglu(x: jax.Array, w_gate: jax.Array, w_up: jax.Array, w_down: jax.Array) -> jax.Array:
    """down(silu(x @ gate) * (x @ up)), weights stored [in, out]."""
    return (jax.nn.silu(x @ w_gate) * (x @ w_up)) @ w_down
