"""The one attention entry point models call; it picks an implementation per backend.

Only the XLA reference exists so far; Pallas kernels plug in here.
"""

from __future__ import annotations

import jax

from jaxinfer.pallas import reference

IMPLEMENTATIONS = ("xla",)


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
    impl: str = "xla",
) -> jax.Array:
    """Causal GQA attention; shapes and masking as in `reference.attention`."""
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"attention={impl!r}; available: {', '.join(IMPLEMENTATIONS)}")
    return reference.attention(
        q, k, v, q_positions, window=window, softcap=softcap, scale=scale, kv_lengths=kv_lengths
    )
