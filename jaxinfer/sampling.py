"""Token sampling with per-row parameters: greedy, temperature, top-k, top-p, min-p."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How one request picks tokens. temperature=0 is greedy; top_k=0 and top_p=1 are off."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    seed: int = 0

    def __post_init__(self):
        checks = [
            (self.temperature >= 0, f"temperature={self.temperature} must be >= 0"),
            (self.top_k >= 0, f"top_k={self.top_k} must be >= 0 (0 turns it off)"),
            (0 < self.top_p <= 1, f"top_p={self.top_p} must be in (0, 1]"),
            (0 <= self.min_p <= 1, f"min_p={self.min_p} must be in [0, 1]"),
            (0 <= self.seed < 2**32, f"seed={self.seed} must be in [0, 2**32)"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class SamplingArrays:
    """SamplingParams of every row as device arrays [batch], so mixing them never recompiles."""

    temperature: jax.Array
    top_k: jax.Array
    top_p: jax.Array
    min_p: jax.Array
    seed: jax.Array

    @classmethod
    def stack(cls, rows: list[SamplingParams]) -> SamplingArrays:
        column = lambda name, dtype: np.array([getattr(r, name) for r in rows], dtype)  # noqa: E731
        return cls(
            temperature=column("temperature", np.float32),
            top_k=column("top_k", np.int32),
            top_p=column("top_p", np.float32),
            min_p=column("min_p", np.float32),
            seed=column("seed", np.uint32),
        )


def sample(logits: jax.Array, params: SamplingArrays, count: jax.Array) -> jax.Array:
    """logits [batch, vocab] -> tokens [batch]. `count` ([batch] or a scalar): tokens each row
    has generated so far; row b's draw is keyed on (its seed, count[b]) alone, so a seeded
    request draws the same tokens in generate(), in any serving slot and at any batch width."""
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)

    def draw() -> jax.Array:
        temperature = jnp.maximum(params.temperature, 1e-6)[:, None]
        scaled = logits.astype(jnp.float32) / temperature
        ranked = -jnp.sort(-scaled, axis=-1)  # descending
        probs = jax.nn.softmax(ranked, axis=-1)
        rank = jnp.arange(scaled.shape[-1])[None]
        top_k = jnp.where(params.top_k > 0, params.top_k, scaled.shape[-1])[:, None]
        keep = rank < top_k
        keep &= (jnp.cumsum(probs, axis=-1) - probs) < params.top_p[:, None]
        keep &= probs >= params.min_p[:, None] * probs[:, :1]
        keep = keep.at[:, 0].set(True)  # the most likely token always survives
        # Keep every token scoring at least the lowest kept rank's score.
        threshold = jnp.min(jnp.where(keep, ranked, jnp.inf), axis=-1, keepdims=True)
        filtered = jnp.where(scaled >= threshold, scaled, -jnp.inf)
        counts = jnp.broadcast_to(count, params.seed.shape)
        keys = jax.vmap(lambda s, c: jax.random.fold_in(jax.random.key(s), c))(params.seed, counts)
        drawn = jax.vmap(jax.random.categorical)(keys, filtered).astype(jnp.int32)
        return jnp.where(params.temperature > 0, drawn, greedy)

    return jax.lax.cond(jnp.any(params.temperature > 0), draw, lambda: greedy)
