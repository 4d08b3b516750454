"""The one attention entry point models call; it picks an implementation per backend.

Only the XLA reference exists so far; Pallas kernels plug in here.
"""

from __future__ import annotations

import jax

from jaxinfer.pallas import reference

IMPLEMENTATIONS = ("xla",)


def _check_impl(impl: str) -> None:
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"attention={impl!r}; available: {', '.join(IMPLEMENTATIONS)}")


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
    _check_impl(impl)
    return reference.attention(
        q, k, v, q_positions, window=window, softcap=softcap, scale=scale, kv_lengths=kv_lengths
    )


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
    impl: str = "xla",
) -> jax.Array:
    """Attention of a few new tokens per row against a paged cache (decode).

    q: [batch, seq, heads, head_dim]; k_pages, v_pages: [kv_heads, num_pages, page_size,
    head_dim], or [layers, ...] with `layer` picking one; page_table: [batch, pages_per_seq].
    Masking and output as in `reference.paged_attention`.
    """
    _check_impl(impl)
    if k_pages.ndim == 5:
        k_pages, v_pages = k_pages[layer], v_pages[layer]
    return reference.paged_attention(
        q, k_pages, v_pages, page_table, q_positions,
        window=window, softcap=softcap, scale=scale, kv_lengths=kv_lengths,
    )
