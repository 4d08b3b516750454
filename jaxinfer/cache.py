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
