"""Model quality checks: perplexity of a token sequence."""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxinfer.cache import KVCache
from jaxinfer.config import ModelConfig
from jaxinfer.models import family


@functools.partial(jax.jit, static_argnames=("cfg",))
def _forward(params, tokens: jax.Array, cfg: ModelConfig) -> jax.Array:
    seq = tokens.shape[1]
    logits, _ = family(cfg.architecture).forward(
        params, tokens, jnp.arange(seq)[None], KVCache.init(cfg, 1, seq), cfg
    )
    return logits[0]


def forward_logits(params, tokens: Sequence[int], cfg: ModelConfig) -> jax.Array:
    """fp32 logits [seq, vocab] of one token sequence (no generation, no buckets)."""
    return _forward(params, jnp.asarray([list(tokens)], jnp.int32), cfg)


@functools.partial(jax.jit, static_argnames=("cfg",))
def _nll(params, tokens: jax.Array, cfg: ModelConfig) -> jax.Array:
    """Summed negative log-likelihood of tokens[1:] given their prefixes; tokens: [1, seq]."""
    logp = jax.nn.log_softmax(_forward(params, tokens, cfg)[:-1], axis=-1)
    return -jnp.sum(jnp.take_along_axis(logp, tokens[0, 1:, None], axis=-1))


def perplexity(params, cfg: ModelConfig, tokens: Sequence[int], window: int = 512) -> float:
    """exp(mean NLL per token) of `tokens`, scored in consecutive windows of up to `window`
    tokens that overlap by one (the previous window's last token is the next one's context)."""
    tokens = np.asarray(tokens, np.int32)
    if len(tokens) < 2:
        raise ValueError(f"perplexity needs at least 2 tokens, got {len(tokens)}")
    window = min(window, cfg.max_seq_len)
    total, count = 0.0, 0
    for start in range(0, len(tokens) - 1, window - 1):
        chunk = tokens[start : start + window]
        total += float(_nll(params, jnp.asarray(chunk[None]), cfg))
        count += len(chunk) - 1
    return float(np.exp(total / count))
