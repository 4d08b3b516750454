"""Drafts for speculative decoding: tokens proposed to follow each row's newest token, which
`decode.speculative_step` verifies in one model call.

n-gram (prompt lookup) drafts need no extra model: the row's last n tokens are looked up in
its own prompt and output, and the tokens that followed their latest earlier occurrence are
proposed. It is plain `jnp` over a [rows, length] token history, so it runs inside the
compiled decode loop with no host round trip.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxinfer.decode import NO_TOKEN  # also: a place with no proposal

METHODS = ("none", "ngram")
MAX_SPECULATIVE_TOKENS = 7  # k + 1 query tokens per row: what the paged decode kernel takes
MAX_NGRAM = 3  # the longest suffix looked up; shorter ones are tried when it does not occur


def check_options(method: str, num_speculative_tokens: int) -> None:
    """Raises ValueError, saying what is allowed, for options generate() and the engine take."""
    if method not in METHODS:
        raise ValueError(f"speculative_method={method!r}; allowed: {', '.join(METHODS)}")
    k = num_speculative_tokens
    if method != "none" and (isinstance(k, bool) or not isinstance(k, int)
                             or not 1 <= k <= MAX_SPECULATIVE_TOKENS):
        raise ValueError(f"num_speculative_tokens={k!r}; with speculative_method={method!r} "
                         f"it must be an integer in 1..{MAX_SPECULATIVE_TOKENS}")


def ngram_draft(history: jax.Array, position: jax.Array, k: int,
                max_ngram: int = MAX_NGRAM) -> jax.Array:
    """Prompt-lookup drafts: history [rows, length] int32 holds each row's tokens by position
    (prompt, then output), its newest token at position [rows]; places past it are ignored.

    For n from `max_ngram` down to 1, the row's last n tokens (ending at `position`) are
    matched against every earlier n-gram of the history; at the longest n that occurs, the
    latest occurrence wins, and the up to `k` tokens that followed it (known ones only, so
    never past `position`) are the draft. Returns [rows, k] int32, NO_TOKEN where a row has
    fewer proposals (none when even its newest token never occurred before).
    """
    rows, length = history.shape
    start = jnp.arange(length, dtype=jnp.int32)[None]  # where an earlier occurrence starts
    end = position[:, None]
    found_start = jnp.full(rows, -1, jnp.int32)
    found_n = jnp.zeros(rows, jnp.int32)
    padded = jnp.pad(history, ((0, 0), (0, max_ngram)), constant_values=NO_TOKEN)
    for n in range(max_ngram, 0, -1):
        # The occurrence ends before the newest token, so at least one token follows it.
        match = (start + n <= end) & (end - n + 1 >= 0)
        for i in range(n):
            suffix = jnp.take_along_axis(history, jnp.maximum(end - n + 1 + i, 0), axis=1)
            match &= padded[:, i: i + length] == suffix
        latest = jnp.max(jnp.where(match, start, -1), axis=1)
        take = (found_start < 0) & (latest >= 0)
        found_start = jnp.where(take, latest, found_start)
        found_n = jnp.where(take, n, found_n)
    follow = (found_start + found_n)[:, None] + jnp.arange(k, dtype=jnp.int32)[None]
    draft = jnp.take_along_axis(history, jnp.clip(follow, 0, length - 1), axis=1)
    return jnp.where((found_start[:, None] >= 0) & (follow <= end), draft, NO_TOKEN)
