"""KV caches as pytree values: every update returns a new cache."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxinfer import pallas
from jaxinfer.config import ModelConfig


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
    """Dense cache for `generate()`: k, v [layers, batch, kv_heads, max_len, head_dim].

    Position p of row b holds the key/value of that row's token at position p; attention
    masks by position, so slots past a row's length may hold stale values.
    """

    k: jax.Array
    v: jax.Array

    @classmethod
    def init(cls, cfg: ModelConfig, batch: int, max_len: int) -> KVCache:
        shape = (cfg.n_layers, batch, cfg.n_kv_heads, max_len, cfg.head_dim)
        return cls(k=jnp.zeros(shape, cfg.dtype), v=jnp.zeros(shape, cfg.dtype))

    @property
    def max_len(self) -> int:
        return self.k.shape[3]

    def update(
        self, layer: jax.Array, positions: jax.Array, k_new: jax.Array, v_new: jax.Array
    ) -> KVCache:
        """Writes `k_new, v_new: [batch, seq, kv_heads, head_dim]` at `positions: [batch, seq]`."""
        rows = jnp.arange(positions.shape[0])[:, None]
        # Advanced indices split by a slice put their [batch, seq] dims first: [b, s, kv, d].
        k = self.k.at[layer, rows, :, positions].set(k_new.astype(self.k.dtype))
        v = self.v.at[layer, rows, :, positions].set(v_new.astype(self.v.dtype))
        return KVCache(k=k, v=v)

    def attend(self, layer: jax.Array, q: jax.Array, positions: jax.Array, **options) -> jax.Array:
        """Attention of `q: [batch, seq, heads, head_dim]` at `positions` over this layer's
        cache; `options` (window, softcap, scale, impl) go to `jaxinfer.pallas.attention`."""
        return pallas.attention(q, self.k[layer], self.v[layer], positions, **options)


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
    """

    k_pages: jax.Array
    v_pages: jax.Array
    page_table: jax.Array

    # Calls with at most this many query tokens per row use the paged decode kernel; longer
    # ones (prefill chunks) gather the row's pages into a dense view for the prefill kernel.
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
        return cls(
            k_pages=jnp.zeros(shape, cfg.dtype),
            v_pages=jnp.zeros(shape, cfg.dtype),
            page_table=jnp.zeros((batch, pages_per_seq), jnp.int32),
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
        k = self.k_pages.at[layer, :, page, offset].set(k_new.astype(self.k_pages.dtype))
        v = self.v_pages.at[layer, :, page, offset].set(v_new.astype(self.v_pages.dtype))
        return dataclasses.replace(self, k_pages=k, v_pages=v)

    def attend(self, layer: jax.Array, q: jax.Array, positions: jax.Array, **options) -> jax.Array:
        """Attention of `q: [batch, seq, heads, head_dim]` at `positions` over this layer's
        pages; `options` (window, softcap, scale, impl) go to `jaxinfer.pallas`.

        Up to DECODE_MAX_TOKENS tokens per row: `pallas.paged_attention` reads the pages in
        place. More (prefill): the row's pages are gathered into a dense
        [batch, kv_heads, max_len, head_dim] view first, then `pallas.attention` runs on it.
        """
        if q.shape[1] <= self.DECODE_MAX_TOKENS:
            return pallas.paged_attention(
                q, self.k_pages, self.v_pages, self.page_table, positions, layer=layer, **options
            )
        k = pallas.reference.gather_pages(self.k_pages[layer], self.page_table)
        v = pallas.reference.gather_pages(self.v_pages[layer], self.page_table)
        return pallas.attention(q, k, v, positions, **options)
