"""Speculative decoding: drafts, tokens proposed to follow each row's newest token, and `step`,
the decode step that drafts and verifies them (decode.speculative_step) in one model call;
`generate()` and the serving engine both run it.

n-gram (prompt lookup) drafts need no extra model: the row's last n tokens are looked up in
its own prompt and output, and the tokens that followed their latest earlier occurrence are
proposed. It is plain `jnp` over a [rows, length] token history, so it runs inside the
compiled decode loop with no host round trip.

Draft heads (jaxinfer.draft_heads, trained by jaxinfer.distill, carried as `params["draft"]`)
propose k tokens from the hidden state the newest token was drawn from, kept in the
DecodeState's `feature`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxinfer import decode, draft_heads
from jaxinfer.config import ModelConfig
from jaxinfer.decode import NO_TOKEN, DecodeState  # NO_TOKEN also: a place with no proposal

METHODS = ("none", "ngram", "draft")
MAX_SPECULATIVE_TOKENS = 7  # k + 1 query tokens per row: what the paged decode kernel takes
MAX_NGRAM = 3  # the longest suffix looked up; shorter ones are tried when it does not occur
# Single tokens recur everywhere: on free chat they drafted 8x as often as 2-grams and were
# almost never accepted (SmolLM2, 96 tokens: 4 of 160), while costing a verify step each.
MIN_NGRAM = 2


def check_options(method: str, num_speculative_tokens: int, params=None) -> None:
    """Raises ValueError, saying what is allowed, for options generate() and the engine take
    (with `params`: also that the "draft" method has draft heads enough for k tokens)."""
    if method not in METHODS:
        raise ValueError(f"speculative_method={method!r}; allowed: {', '.join(METHODS)}")
    k = num_speculative_tokens
    if method != "none" and (isinstance(k, bool) or not isinstance(k, int)
                             or not 1 <= k <= MAX_SPECULATIVE_TOKENS):
        raise ValueError(f"num_speculative_tokens={k!r}; with speculative_method={method!r} "
                         f"it must be an integer in 1..{MAX_SPECULATIVE_TOKENS}")
    if method == "draft" and params is not None:
        if "draft" not in params:
            raise ValueError("speculative_method='draft' needs draft heads: load the model "
                             "with load_model(..., draft=PATH) (--speculative_model=PATH); "
                             "train them with python -m jaxinfer.launch.distill")
        if k > (heads := draft_heads.num_heads(params["draft"])):
            raise ValueError(f"num_speculative_tokens={k}; the draft has {heads} heads, so at "
                             f"most {heads}")


def ngram_draft(history: jax.Array, position: jax.Array, k: int, max_ngram: int = MAX_NGRAM,
                min_ngram: int = MIN_NGRAM) -> jax.Array:
    """Prompt-lookup drafts: history [rows, length] int32 holds each row's tokens by position
    (prompt, then output), its newest token at position [rows]; places past it are ignored.

    For n from `max_ngram` down to `min_ngram`, the row's last n tokens (ending at `position`) are
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
    for n in range(max_ngram, min_ngram - 1, -1):
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


def step(params, cache, state: DecodeState, k: int, cfg: ModelConfig, method: str = "ngram",
         with_logits: bool = False):
    """One decode step for every row that drafts up to `k` tokens per row — by n-gram lookup
    in `state.history` ("ngram") or with `params["draft"]`'s heads from `state.feature`
    ("draft") — and verifies them (decode.speculative_step); when no live row has a draft, it
    takes the plain one-token step (decode.step) instead, which costs less. Returns (cache,
    state, emitted [rows, k + 1] (NO_TOKEN past a row's end), how many [rows], the draft
    tokens proposed [rows], how many of them were accepted [rows]); `with_logits`: and the fp32
    logits [rows, k + 1, vocab] each emitted token was drawn from (zeros past the emitted)."""
    rows = state.last.shape[0]
    if method == "draft":
        draft = draft_heads.propose(params["draft"], params, state.feature, state.last, k, cfg)
    else:
        draft = ngram_draft(state.history, state.position, k)
    draft = jnp.where(state.done[:, None], NO_TOKEN, draft)
    proposed = jnp.sum(draft != NO_TOKEN, axis=1, dtype=jnp.int32)

    def verify(cache, state):
        out = decode.speculative_step(params, cache, state, draft, cfg)
        return out if with_logits else out[:5]

    def plain(cache, state):
        cache, state, token, logits = decode.step(params, cache, state, cfg)
        emitted = jnp.full((rows, k + 1), NO_TOKEN, jnp.int32).at[:, 0].set(token)
        out = (cache, state, emitted, (token != NO_TOKEN).astype(jnp.int32),
               jnp.zeros(rows, jnp.int32))
        return out + (jnp.pad(logits[:, None], ((0, 0), (0, k), (0, 0))),) if with_logits else out

    if method == "draft":  # heads always propose: a cond would only cost (its operand copies)
        out = verify(cache, state)
    else:
        out = jax.lax.cond(jnp.any(proposed > 0), verify, plain, cache, state)
    cache, state, emitted, n, accepted = out[:5]
    return (cache, state, emitted, n, proposed, accepted) + out[5:]
