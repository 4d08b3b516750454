"""The one attention entry point models call; it picks an implementation per backend.

impl="xla": blocked attention in plain XLA (blocked.py): it reads only the cache blocks some
query can see, and is tested against the plain-jnp references (reference.py).
impl="cpu": the CPU decode-attention kernel (jaxinfer.kernels.cpu.attention) for up to
MAX_QUERIES queries per row, each query reading only its own visible keys; longer calls
(prefill) take the XLA path. impl="pallas": the Pallas kernels (flash_attention.py for
prefill, paged_attention.py for decode against a paged cache), compiled for the GPU (Triton)
or TPU (Mosaic), and run with `interpret=True` on any other backend (how CI checks them on
CPU). impl="auto": Pallas on GPU and TPU when the kernels support the shape (head_dim
64/128/256); on CPU the kernel when it is built (and no multi-device mesh is active: a custom
call is opaque to the partitioner); otherwise XLA.
"""

from __future__ import annotations

import jax

from jaxinfer.kernels import cpu
from jaxinfer.pallas import blocked, reference  # noqa: F401  (callers use pallas.reference)
from jaxinfer.pallas.flash_attention import SUPPORTED_HEAD_DIMS, flash_attention
from jaxinfer.pallas.paged_attention import paged_attention as paged_kernel

IMPLEMENTATIONS = ("auto", "xla", "pallas", "cpu")
KERNEL_BACKENDS = ("gpu", "tpu")  # where the kernels compile; elsewhere they are interpreted


def resolve(impl: str, head_dim: int | None = None) -> str:
    """"xla", "cpu" or "pallas" for `impl` on the current backend ("auto": see above)."""
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"attention={impl!r}; allowed: {', '.join(IMPLEMENTATIONS)}")
    if impl == "cpu" and not cpu.available():  # not built here (its build warned) or off
        return "xla"
    if impl != "auto":
        return impl
    supported = head_dim is None or head_dim in SUPPORTED_HEAD_DIMS
    if jax.default_backend() in KERNEL_BACKENDS and supported:
        return "pallas"
    return "cpu" if cpu.usable_here() else "xla"


def _interpret() -> bool:
    return jax.default_backend() not in KERNEL_BACKENDS


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    q_positions: jax.Array,
    *,
    layer: int | jax.Array | None = None,
    scales: tuple[jax.Array, jax.Array] | None = None,
    window: int | jax.Array | None = None,
    softcap: float | None = None,
    scale: float | None = None,
    kv_lengths: jax.Array | None = None,
    impl: str = "xla",
    sinks: jax.Array | None = None,
    batch_invariant: bool = False,
) -> jax.Array:
    """Causal GQA attention against a dense cache k, v [batch, kv_heads, max_len, head_dim],
    or [layers, ...] with `layer` (may be traced) picking one; an int8 cache comes with
    `scales` (k's and v's, shaped as k without head_dim). Shapes and masking as in
    `reference.attention`. window may be a traced int32 scalar. `sinks` [heads] (gpt-oss's
    attention sinks) run on the XLA and CPU paths only: the Pallas kernels have no sink term
    yet. `batch_invariant`: on the CPU kernel, any number of queries (prefill too), so a row's
    bits never depend on the batch or the prompt length bucket."""
    options = dict(window=window, softcap=softcap, scale=scale, kv_lengths=kv_lengths)
    chosen, max_queries = resolve(impl, q.shape[-1]), None if batch_invariant else cpu.MAX_QUERIES
    if chosen == "cpu" and cpu.attention_supports(q, k, max_queries):
        return cpu.attention(q, k, v, q_positions, layer=layer, scales=scales, sinks=sinks,
                             max_queries=max_queries, **options)
    if sinks is not None:
        return blocked.attention(q, k, v, q_positions, layer=layer, scales=scales,
                                 sinks=sinks, **options)
    if chosen == "pallas":
        if layer is not None:
            k, v = k[layer], v[layer]
            scales = None if scales is None else (scales[0][layer], scales[1][layer])
        if scales is not None:
            k, v = (blocked.dequantize(x, s, q.dtype) for x, s in zip((k, v), scales, strict=True))
        return flash_attention(q, k, v, q_positions, interpret=_interpret(), **options)
    return blocked.attention(q, k, v, q_positions, layer=layer, scales=scales, **options)


def paged_attention(
    q: jax.Array,
    k_pages: jax.Array,
    v_pages: jax.Array,
    page_table: jax.Array,
    q_positions: jax.Array,
    *,
    layer: int | jax.Array | None = None,
    scales: tuple[jax.Array, jax.Array] | None = None,
    window: int | jax.Array | None = None,
    softcap: float | None = None,
    scale: float | None = None,
    kv_lengths: jax.Array | None = None,
    impl: str = "xla",
    sinks: jax.Array | None = None,
    batch_invariant: bool = False,
) -> jax.Array:
    """Attention of new tokens against a paged cache (the Pallas kernel: a few per row, decode;
    the XLA path: any number, and the only one with `sinks`, as in `attention`).

    q: [batch, seq, heads, head_dim]; k_pages, v_pages: [kv_heads, num_pages, page_size,
    head_dim], or [layers, ...] with `layer` (may be traced) picking one; page_table:
    [batch, pages_per_seq]. int8 pages come with `scales` (k's, v's: the pages' shape without
    head_dim; XLA path only). Masking and output as in `reference.paged_attention`.
    """
    options = dict(window=window, softcap=softcap, scale=scale, kv_lengths=kv_lengths)
    chosen, max_queries = resolve(impl, q.shape[-1]), None if batch_invariant else cpu.MAX_QUERIES
    if chosen == "cpu" and cpu.attention_supports(q, k_pages, max_queries):
        return cpu.attention(q, k_pages, v_pages, q_positions, page_table=page_table,
                             layer=layer, scales=scales, sinks=sinks, max_queries=max_queries,
                             **options)
    if chosen == "pallas" and sinks is None:
        if scales is not None:
            raise ValueError("the paged Pallas kernel reads float pages; dequantize int8 "
                             "pages into a dense view and call attention()")
        return paged_kernel(q, k_pages, v_pages, page_table, q_positions, layer=layer,
                            interpret=_interpret(), **options)
    return blocked.paged_attention(q, k_pages, v_pages, page_table, q_positions,
                                   layer=layer if k_pages.ndim == 5 else None, scales=scales,
                                   sinks=sinks, **options)
