"""Green-list watermark of generated text, and its detector.

The scheme of Kirchenbauer, Geiping, Wen, Katz, Miers and Goldstein, "A Watermark for Large
Language Models" (ICML 2023, arXiv:2301.10226): before each draw, a hash of (secret key,
previous token) splits the vocabulary into a green list of about GAMMA * vocab tokens and a
red rest, and DELTA is added to the green logits (a "soft" watermark: low-entropy choices are
barely touched). Text from the model then holds more green tokens than the GAMMA share that
text written without the key holds, which a one-proportion z-test detects:

    z = (green - GAMMA * T) / sqrt(T * GAMMA * (1 - GAMMA))     (T tokens scored)

Each token is green with probability GAMMA by its own hash (rather than by a seeded
permutation of the whole vocabulary, the paper's reference code): the green list then has
GAMMA * vocab tokens in expectation, the z-test's null holds token by token, and the detector
hashes only the tokens it scores. The same `_mix` runs on numpy (detector) and jax (sampler).
"""

from __future__ import annotations

import hashlib
import math

import jax
import jax.numpy as jnp
import numpy as np

GAMMA = 0.25  # share of the vocabulary that is green (the paper's gamma)
# Added to green logits (the paper's delta). SmolLM2, 50 texts of 200 tokens at temperature 1
# (benchmarks/results/watermark.md): delta 2.0 gave z >= 7.14 at +55% perplexity, 1.5 gives
# z >= 5.51 (still > 4) at +24%.
DELTA = 1.5
_GREEN_BELOW = np.uint32(int(GAMMA * 2**32))  # a token is green when its hash is below this


def key_words(key: str) -> np.ndarray:
    """The secret key -> its material for the sampler and detector: uint32 [2] (SHA-256)."""
    if not key:
        raise ValueError("the watermark key is empty; give a secret string")
    return np.frombuffer(hashlib.sha256(key.encode()).digest()[:8], np.uint32).copy()


def _mix(h, xp):
    """murmur3's 32-bit finalizer: a bijection on uint32 that spreads every input bit."""
    h = h ^ (h >> xp.uint32(16))
    h = h * xp.uint32(0x85EBCA6B)
    h = h ^ (h >> xp.uint32(13))
    h = h * xp.uint32(0xC2B2AE35)
    return h ^ (h >> xp.uint32(16))


def green(words, previous, token, xp=np):
    """Whether `token` is green after `previous` under key `words` [..., 2]; broadcasts.
    `xp`: numpy (the detector) or jax.numpy (the sampler), the same arithmetic."""
    u32 = lambda x: xp.asarray(x).astype(xp.uint32)  # noqa: E731
    words = u32(words)
    seed = _mix(u32(previous) ^ words[..., 0], xp)  # the green list of this context
    return _mix(_mix(seed ^ u32(token), xp) ^ words[..., 1], xp) < xp.uint32(_GREEN_BELOW)


def bias(logits: jax.Array, on: jax.Array, words: jax.Array, previous: jax.Array) -> jax.Array:
    """logits [batch, vocab] + DELTA on the green list after `previous` [batch] of every row
    that is `on` [batch] bool (key `words` [batch, 2] uint32). Rows that are off keep their
    logits bitwise; nothing is computed when no row is on."""

    def mark(logits):
        vocab = jnp.arange(logits.shape[-1])[None]
        is_green = green(words[:, None, :], jnp.maximum(previous, 0)[:, None], vocab, jnp)
        return jnp.where(on[:, None] & is_green, logits + DELTA, logits)

    return jax.lax.cond(jnp.any(on), mark, lambda x: x, logits)


def detect(token_ids, key: str, *, unique: bool = True) -> tuple[float, float, int]:
    """Scores text `token_ids` [T] for the watermark of `key`: (z, one-sided p-value, tokens
    scored). Token i is scored against token i - 1 (the first has no context). `unique`: score
    each (previous, token) pair once, as the paper's follow-up (arXiv:2306.04634) advises, so
    repeated phrases in unmarked text do not inflate z."""
    tokens = np.asarray(token_ids, np.int64).reshape(-1)
    if tokens.size and (tokens.min() < 0 or tokens.max() >= 2**32):
        raise ValueError(f"token ids must be in [0, 2**32); got {tokens.min()}..{tokens.max()}")
    pairs = np.stack([tokens[:-1], tokens[1:]], axis=-1)
    if unique and len(pairs):
        pairs = np.unique(pairs, axis=0)
    scored = len(pairs)
    if scored == 0:
        raise ValueError(f"need at least 2 tokens to score a watermark; got {tokens.size}")
    hits = int(np.sum(green(key_words(key), pairs[:, 0], pairs[:, 1])))
    z = (hits - GAMMA * scored) / math.sqrt(scored * GAMMA * (1 - GAMMA))
    return z, 0.5 * math.erfc(z / math.sqrt(2)), scored  # p = P(Z >= z) under no watermark
