"""KV caches as pytree values: every update returns a new cache."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxinfer import pallas
from jaxinfer.config import ModelConfig


def quantize_kv(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """[..., head_dim] -> int8 values and one fp32 scale per token and head ([...])."""
    x32 = x.astype(jnp.float32)
    scale = jnp.max(jnp.abs(x32), axis=-1) / 127
    q = jnp.round(x32 / jnp.where(scale == 0, 1, scale)[..., None])
    return jnp.clip(q, -127, 127).astype(jnp.int8), scale


def dequantize_kv(q: jax.Array, scale: jax.Array | None, dtype) -> jax.Array:
    """int8 cache values and their scales -> `dtype` (a float cache passes through)."""
    if scale is None:
        return q.astype(dtype)
    return (q.astype(jnp.float32) * scale[..., None]).astype(dtype)


def _zeros_and_scales(cfg: ModelConfig, shape: tuple[int, ...]):
    """Empty k/v storage of `shape` [..., head_dim] (int8 + per-token scales for kv_quant)."""
    if cfg.kv_quant == "int8":
        return jnp.zeros(shape, jnp.int8), jnp.ones(shape[:-1], jnp.float32)
    return jnp.zeros(shape, cfg.dtype), None


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
    """Dense cache for `generate()`: k, v [layers, batch, kv_heads, max_len, head_dim].

    Position p of row b holds the key/value of that row's token at position p; attention
    masks by position, so slots past a row's length may hold stale values. With
    `cfg.kv_quant="int8"`, k and v are int8 with one fp32 scale per token and head in
    k_scale, v_scale [layers, batch, kv_heads, max_len]; else those are None.
    """

    k: jax.Array
    v: jax.Array
    k_scale: jax.Array | None = None
    v_scale: jax.Array | None = None

    @classmethod
    def init(cls, cfg: ModelConfig, batch: int, max_len: int) -> KVCache:
        shape = (cfg.n_layers, batch, cfg.n_kv_heads, max_len, cfg.head_dim)
        (k, k_scale), (v, v_scale) = _zeros_and_scales(cfg, shape), _zeros_and_scales(cfg, shape)
        return cls(k=k, v=v, k_scale=k_scale, v_scale=v_scale)

    @property
    def max_len(self) -> int:
        return self.k.shape[3]

    def update(
        self, layer: jax.Array, positions: jax.Array, k_new: jax.Array, v_new: jax.Array
    ) -> KVCache:
        """Writes `k_new, v_new: [batch, seq, kv_heads, head_dim]` at `positions: [batch, seq]`."""
        rows = jnp.arange(positions.shape[0])[:, None]
        # Advanced indices split by a slice put their [batch, seq] dims first: [b, s, kv, d].
        if self.k_scale is None:
            k = self.k.at[layer, rows, :, positions].set(k_new.astype(self.k.dtype))
            v = self.v.at[layer, rows, :, positions].set(v_new.astype(self.v.dtype))
            return KVCache(k=k, v=v)
        (kq, ks), (vq, vs) = quantize_kv(k_new), quantize_kv(v_new)
        return KVCache(
            k=self.k.at[layer, rows, :, positions].set(kq),
            v=self.v.at[layer, rows, :, positions].set(vq),
            k_scale=self.k_scale.at[layer, rows, :, positions].set(ks),
            v_scale=self.v_scale.at[layer, rows, :, positions].set(vs),
        )

    def attend(self, layer: jax.Array, q: jax.Array, positions: jax.Array, **options) -> jax.Array:
        """Attention of `q: [batch, seq, heads, head_dim]` at `positions` over this layer's
        cache; `options` (window, softcap, scale, impl) go to `jaxinfer.pallas.attention`.
        The cache is read in place (on CPU only its visible blocks, an int8 cache dequantized
        block by block)."""
        scales = None if self.k_scale is None else (self.k_scale, self.v_scale)
        return pallas.attention(q, self.k, self.v, positions, layer=layer, scales=scales,
                                **options)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class PagedKVCache:
    """Paged cache for serving: a pool of fixed-size pages shared by all rows.

    k_pages, v_pages: [layers, kv_heads, num_pages, page_size, head_dim]; page_table:
    [batch, pages_per_seq] int32, row b's token at position p lives in page
    page_table[b, p // page_size] at offset p % page_size. Page 0 is scratch: an allocator
    never hands it out and unused table entries are 0, so writes of padding tokens, of
    inactive rows and of positions past the table land there harmlessly. As in `KVCache`,
    attention masks by position (key j is visible to a query at p iff j <= p, and within the
    window), so a row's length is implied by its query positions and needs no field here.
    With `cfg.kv_quant="int8"` the pages hold int8 and k_scales, v_scales [layers, kv_heads,
    num_pages, page_size] one fp32 scale per token and head.
    """

    k_pages: jax.Array
    v_pages: jax.Array
    page_table: jax.Array
    k_scales: jax.Array | None = None
    v_scales: jax.Array | None = None

    # With Pallas, calls with at most this many query tokens per row use the paged decode
    # kernel; longer ones (prefill chunks) gather the row's pages into a dense view for the
    # prefill kernel. The XLA path reads the pages in place for any number.
    DECODE_MAX_TOKENS = 8

    @classmethod
    def init(
        cls, cfg: ModelConfig, num_pages: int, page_size: int, batch: int, pages_per_seq: int
    ) -> PagedKVCache:
        """An empty pool of `num_pages` pages (page 0 included) and an all-scratch table."""
        if num_pages < 2:
            raise ValueError(f"num_pages={num_pages}; need at least 2 (page 0 is scratch)")
        if page_size < 1 or pages_per_seq < 1:
            raise ValueError(
                f"page_size={page_size}, pages_per_seq={pages_per_seq}; both must be >= 1"
            )
        shape = (cfg.n_layers, cfg.n_kv_heads, num_pages, page_size, cfg.head_dim)
        (k, k_scales), (v, v_scales) = _zeros_and_scales(cfg, shape), _zeros_and_scales(cfg, shape)
        return cls(
            k_pages=k,
            v_pages=v,
            page_table=jnp.zeros((batch, pages_per_seq), jnp.int32),
            k_scales=k_scales,
            v_scales=v_scales,
        )

    @property
    def page_size(self) -> int:
        return self.k_pages.shape[3]

    @property
    def num_pages(self) -> int:
        return self.k_pages.shape[2]

    @property
    def pages_per_seq(self) -> int:
        return self.page_table.shape[1]

    @property
    def max_len(self) -> int:
        """The most positions one row can hold."""
        return self.pages_per_seq * self.page_size

    def slots(self, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(page, offset) of each position [batch, seq]; positions outside the table -> page 0."""
        index = positions // self.page_size
        inside = (positions >= 0) & (index < self.pages_per_seq)
        index = jnp.clip(index, 0, self.pages_per_seq - 1)
        page = jnp.take_along_axis(self.page_table, index, axis=1)
        return jnp.where(inside, page, 0), jnp.where(inside, positions % self.page_size, 0)

    def update(
        self, layer: jax.Array, positions: jax.Array, k_new: jax.Array, v_new: jax.Array
    ) -> PagedKVCache:
        """Writes `k_new, v_new: [batch, seq, kv_heads, head_dim]` at `positions: [batch, seq]`."""
        page, offset = self.slots(positions)
        # Advanced indices split by a slice put their [batch, seq] dims first: [b, s, kv, d].
        if self.k_scales is None:
            k = self.k_pages.at[layer, :, page, offset].set(k_new.astype(self.k_pages.dtype))
            v = self.v_pages.at[layer, :, page, offset].set(v_new.astype(self.v_pages.dtype))
            return dataclasses.replace(self, k_pages=k, v_pages=v)
        (kq, ks), (vq, vs) = quantize_kv(k_new), quantize_kv(v_new)
        return dataclasses.replace(
            self,
            k_pages=self.k_pages.at[layer, :, page, offset].set(kq),
            v_pages=self.v_pages.at[layer, :, page, offset].set(vq),
            k_scales=self.k_scales.at[layer, :, page, offset].set(ks),
            v_scales=self.v_scales.at[layer, :, page, offset].set(vs),
        )

    def attend(self, layer: jax.Array, q: jax.Array, positions: jax.Array, **options) -> jax.Array:
        """Attention of `q: [batch, seq, heads, head_dim]` at `positions` over this layer's
        pages; `options` (window, softcap, scale, impl) go to `jaxinfer.pallas`.

        On the XLA path `pallas.paged_attention` reads the pages in place (int8 ones
        dequantized block by block) for any number of tokens. With Pallas, up to
        DECODE_MAX_TOKENS tokens per row go to the paged kernel; more (prefill), or int8
        pages, are gathered into a dense [batch, kv_heads, max_len, head_dim] view first, then
        `pallas.attention` runs on it.
        """
        in_place = pallas.resolve(options.get("impl", "xla"), q.shape[-1]) != "pallas"
        if in_place or options.get("sinks") is not None:  # sinks: the XLA and CPU paths only
            scales = None if self.k_scales is None else (self.k_scales, self.v_scales)
            return pallas.paged_attention(q, self.k_pages, self.v_pages, self.page_table,
                                          positions, layer=layer, scales=scales, **options)
        if self.k_scales is not None:
            k = self._gather_dequantized(self.k_pages[layer], self.k_scales[layer], q.dtype)
            v = self._gather_dequantized(self.v_pages[layer], self.v_scales[layer], q.dtype)
            return pallas.attention(q, k, v, positions, **options)
        if q.shape[1] <= self.DECODE_MAX_TOKENS:
            return pallas.paged_attention(
                q, self.k_pages, self.v_pages, self.page_table, positions, layer=layer, **options
            )
        k = pallas.reference.gather_pages(self.k_pages[layer], self.page_table)
        v = pallas.reference.gather_pages(self.v_pages[layer], self.page_table)
        return pallas.attention(q, k, v, positions, **options)

    def _gather_dequantized(self, pages: jax.Array, scales: jax.Array, dtype) -> jax.Array:
        """One layer's int8 pages -> dense [batch, kv_heads, max_len, head_dim] in `dtype`."""
        dense = pallas.reference.gather_pages(pages, self.page_table)
        scale = pallas.reference.gather_pages(scales[..., None], self.page_table)[..., 0]
        return dequantize_kv(dense, scale, dtype)
