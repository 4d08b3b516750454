"""Building blocks shared by model families: norms, rotary embeddings, gated MLPs."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxinfer.quant import qarray as quant  # the products only: quantizers sit above


def row_sum(x: jax.Array) -> jax.Array:
    """The sum over the last axis (kept, as size 1) in one fixed order, halving pairwise with
    elementwise adds. XLA's own reduction picks its summation order by the whole array's size
    (on CPU: YNNPACK from 4,096 elements, reduce-window plus reduce below), so a row's sum
    would change with the number of rows; elementwise adds round the same for any shape."""
    while x.shape[-1] > 1:
        half = x.shape[-1] // 2
        pairs = x[..., :half] + x[..., half:2 * half]
        x = pairs if x.shape[-1] % 2 == 0 else jnp.concatenate(
            [pairs[..., :1] + x[..., -1:], pairs[..., 1:]], axis=-1)
    return x


def rms_norm(x: jax.Array, weight: jax.Array, eps: float, offset: float = 0.0) -> jax.Array:
    """RMSNorm over the last axis, scaled by `offset + weight`, as Hugging Face computes it.

    offset 0 (Llama): normalise in fp32, cast back, then scale in the input dtype.
    offset 1 (Gemma's (1 + w)): normalise and scale in fp32, then cast.
    """
    x32 = x.astype(jnp.float32)
    mean = row_sum(x32 * x32) / x.shape[-1]
    normed = x32 * jax.lax.rsqrt(mean + eps)
    if offset:
        return (normed * (offset + weight.astype(jnp.float32))).astype(x.dtype)
    return weight.astype(x.dtype) * normed.astype(x.dtype)


def inv_frequencies(
    head_dim: int, theta: float, freq_factors: tuple[float, ...] | None = None
) -> np.ndarray:
    """Rotary inverse frequencies [head_dim / 2] (fp32); `freq_factors` divide them, as
    llama.cpp's rope_freqs tensor (Llama 3.1 scaling) or linear rope scaling do."""
    exponents = np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / head_dim
    inv_freq = (1.0 / np.float32(theta) ** exponents).astype(np.float32)
    if freq_factors is not None:
        inv_freq = (inv_freq / np.asarray(freq_factors, np.float32)).astype(np.float32)
    return inv_freq


def rope_tables(positions: jax.Array, inv_freq: jax.Array) -> tuple[jax.Array, jax.Array]:
    """cos, sin for `positions: [batch, seq]` and `inv_freq: [head_dim / 2]`: each
    [batch, seq, head_dim] in fp32 (the half-split layout)."""
    angles = positions.astype(jnp.float32)[..., None] * inv_freq.astype(jnp.float32)
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotates `x: [batch, seq, heads, head_dim]` in the half-split (rotate_half) layout."""
    x32 = x.astype(jnp.float32)
    x1, x2 = jnp.split(x32, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    out = x32 * cos[:, :, None, :] + rotated * sin[:, :, None, :]
    return out.astype(x.dtype)


ACTIVATIONS = {
    "silu": jax.nn.silu,
    "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),  # PyTorch's gelu(approximate="tanh")
}


def gated_mlp(
    x: jax.Array, w_gate: jax.Array, w_up: jax.Array, w_down: jax.Array, activation: str = "silu"
) -> jax.Array:
    """down(act(x @ gate) * (x @ up)), weights stored [in, out] (float or quantized)."""
    gate = quant.einsum("...d,df->...f", x, w_gate)
    hidden = ACTIVATIONS[activation](gate) * quant.einsum("...d,df->...f", x, w_up)
    return quant.einsum("...f,fd->...d", hidden, w_down)


def softcap(x: jax.Array, cap: float | None) -> jax.Array:
    """cap * tanh(x / cap) (Gemma's logit soft-capping); x unchanged when cap is None."""
    return x if cap is None else cap * jnp.tanh(x / cap)
