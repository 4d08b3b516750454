"""The one decode core: per-row decode state, the prefill of a set of rows, and one decode step.

`generate()` drives it over a dense cache with `lax.while_loop`; the serving engine drives it
`decode_steps` steps per device call over the paged cache. Both draw random numbers one way,
keyed on (request seed, tokens generated so far), so a seeded request gives the same tokens
through either, in any row.

    state, cache, logits = prefill(params, cache, tokens, lengths, sampling, count, max_tokens,
                                   stop_ids, cfg=cfg)
    cache, state, token, logits = step(params, cache, state, cfg)  # until all(state.done)
    cache, state, tokens, n, accepted, logits = speculative_step(params, cache, state, draft,
                                                                 cfg)  # or: k drafts verified

Sampling draws from `sampling.adjust_logits` of the model's logits (penalties over the row's
`TokenCounts`, logit bias, the green-list watermark keyed on the previous token, min_tokens);
`step` returns the raw logits, which logprobs use.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jaxinfer.cache import KVCache
from jaxinfer.config import ModelConfig
from jaxinfer.models import family
from jaxinfer.sampling import (
    MAX_TOP_LOGPROBS,
    SamplingArrays,
    SamplingParams,
    TokenCounts,
    TokenLogprobs,
    adjust_logits,
    sample,
)

NO_TOKEN = -1  # what a finished (or free) row emits


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class DecodeState:
    """What decoding carries per row besides the KV cache; every field is [rows] unless noted."""

    last: jax.Array  # int32: the newest token, fed to the next step
    position: jax.Array  # int32: where `last` sits in its sequence
    count: jax.Array  # int32: tokens generated so far, `last` included (keys the next draw)
    max_tokens: jax.Array  # int32: the token budget; a row is done when count reaches it
    done: jax.Array  # bool: finished, or a free row; it neither emits nor advances
    stopped: jax.Array  # bool: finished on a stop id (else on its budget)
    stop_ids: jax.Array  # int32 [rows, stops], NO_TOKEN where unused
    sampling: SamplingArrays
    counts: TokenCounts | None = None  # [rows, vocab]: what the penalties look at
    # int32 [rows, length]: each row's tokens by position, `last` included (what n-gram drafts
    # look up; jaxinfer.speculative); None when nothing speculates.
    history: jax.Array | None = None
    # [rows, embed] in the compute dtype: the final hidden state `last` was drawn from (what
    # draft heads read; jaxinfer.draft_heads); None when no draft heads speculate.
    feature: jax.Array | None = None

    @classmethod
    def start(cls, first: jax.Array, position: jax.Array, count: jax.Array,
              max_tokens: jax.Array, stop_ids: jax.Array, sampling: SamplingArrays,
              live: jax.Array | bool = True, counts: TokenCounts | None = None,
              feature: jax.Array | None = None) -> DecodeState:
        """Rows that just sampled `first` at `position` (the prompt length) after `count`
        earlier tokens; rows where `live` is False start done (padding, free slots).
        `counts`: the tokens seen before `first` (None: no penalties in this state);
        `feature`: the hidden state `first` was drawn from (None: no draft heads)."""
        live = jnp.asarray(live)
        hit_stop = jnp.any(first[:, None] == stop_ids, axis=-1)
        if counts is not None:
            counts = counts.add(first, jnp.broadcast_to(live, first.shape))
        count = count + 1
        return cls(last=first, position=position, count=count, max_tokens=max_tokens,
                   done=hit_stop | (count >= max_tokens) | ~live,
                   stopped=hit_stop, stop_ids=stop_ids, sampling=sampling, counts=counts,
                   feature=feature)

    @classmethod
    def empty(cls, rows: int, stops: int, vocab: int | None = None,
              history: int | None = None, feature: tuple | None = None) -> DecodeState:
        """`rows` free rows (all done), with room for `stops` stop ids each (and token counts
        over `vocab` tokens, a token history of `history` positions, and features of
        `feature` = (embed, dtype), if given), on the device. Built on the host and put there
        at once: jnp ops one by one would compile a program each (0.2-0.25 s per row count
        on 2 cores, in a server's start-up)."""
        zeros = lambda shape=rows, dtype=np.int32: np.zeros(shape, dtype)  # noqa: E731
        counts = None if vocab is None else TokenCounts(output=zeros((rows, vocab)),
                                                        prompt=zeros((rows, vocab), bool))
        state = cls(last=zeros(), position=zeros(), count=zeros(), max_tokens=zeros(),
                    done=np.ones(rows, bool), stopped=zeros(rows, bool),
                    stop_ids=np.full((rows, stops), NO_TOKEN, np.int32),
                    sampling=SamplingArrays.stack([SamplingParams()] * rows), counts=counts,
                    history=None if history is None else zeros((rows, history)),
                    feature=None if feature is None else zeros((rows, feature[0]), feature[1]))
        return jax.device_put(state)  # copies: every leaf is a buffer of its own, donatable

    def with_history(self, tokens: jax.Array) -> DecodeState:
        """This state with a token history: `tokens` [rows, length], each row's sequence by
        position up to `position` (later places are ignored), `last` written at `position`."""
        rows = jnp.arange(tokens.shape[0])
        return dataclasses.replace(self, history=tokens.astype(jnp.int32).at[
            rows, self.position].set(self.last, mode="drop"))

    def record(self, token: jax.Array) -> tuple[DecodeState, jax.Array]:
        """Appends `token` [rows] to every unfinished row; returns the new state and what each
        row emitted (NO_TOKEN where it was done already)."""
        state, emitted, _ = self.record_many(token[:, None], jnp.ones_like(self.count))
        return state, emitted[:, 0]

    def record_many(self, tokens: jax.Array,
                    available: jax.Array) -> tuple[DecodeState, jax.Array, jax.Array]:
        """Appends to every unfinished row its first `available` [rows] (>= 1) of `tokens`
        [rows, width], cut after the first stop id and at the row's budget. Returns the new
        state, what each row emitted [rows, width] (NO_TOKEN past its end, and everywhere in a
        row that was done already) and how many tokens that is [rows]."""
        width = tokens.shape[1]
        place = jnp.arange(width)[None]
        is_stop = (tokens >= 0) & jnp.any(tokens[:, :, None] == self.stop_ids[:, None, :], -1)
        first_stop = jnp.min(jnp.where(is_stop, place, width), axis=1)
        n = jnp.minimum(jnp.minimum(available, first_stop + 1), self.max_tokens - self.count)
        n = jnp.where(self.done, 0, jnp.maximum(n, 1))
        kept = place < n[:, None]
        emitted = jnp.where(kept, tokens, NO_TOKEN)
        hit_stop = first_stop < n
        newest = jnp.take_along_axis(tokens, jnp.maximum(n - 1, 0)[:, None], axis=1)[:, 0]
        count = self.count + n
        state = dataclasses.replace(
            self,
            last=jnp.where(n > 0, newest, self.last),
            position=self.position + n,
            count=count,
            done=self.done | hit_stop | (count >= self.max_tokens),
            stopped=self.stopped | hit_stop,
            counts=None if self.counts is None else self.counts.add(tokens, kept),
        )
        if self.history is not None:  # the tokens go at the positions after `last`
            at = jnp.where(kept, self.position[:, None] + 1 + place, self.history.shape[1])
            state.history = self.history.at[jnp.arange(tokens.shape[0])[:, None], at].set(
                tokens, mode="drop")
        return state, emitted, n


def prefill(params, cache, tokens: jax.Array, lengths: jax.Array, sampling: SamplingArrays,
            count: jax.Array, max_tokens: jax.Array, stop_ids: jax.Array,
            live: jax.Array | bool = True, bitmask: jax.Array | None = None, *,
            cfg: ModelConfig, start: jax.Array | None = None, features: bool = False,
            chunk: int | None = None):
    """Runs prompts `tokens` [rows, seq] (row r's in its first lengths[r] places) through the
    model, writing their keys and values into `cache`, and samples each row's first token.

    `count` [rows]: tokens a row generated before (a resumed request: the last `count` of its
    tokens), which keys its draw and counts as output for the penalties. `max_tokens`,
    `stop_ids` [rows, stops] and `live` start the DecodeState (see DecodeState.start);
    `bitmask` [rows, ceil(vocab / 32)]: the tokens each row may draw (sampling.adjust_logits).
    `start` [rows] (default 0): the position of each row's first token; the cache already
    holds the row's earlier positions (a cached prefix, or earlier chunks), which the tokens
    attend to. `features`: keep each row's last hidden state in the DecodeState (for draft
    heads). `chunk`: run the model over at most this many positions at a time, in a loop
    whose chunks attend to the cache the earlier ones wrote (chunked prefill: activations and
    the program's work per step stay those of one chunk however long the prompt). Returns
    (DecodeState [rows], cache, the raw logits [rows, vocab] of the first tokens).
    """
    model = family(cfg.architecture)
    rows, seq = tokens.shape
    last = jnp.maximum(lengths - 1, 0)  # each row's last prompt place
    if chunk is not None and seq > chunk:
        last_hidden, cache = _in_chunks(model, params, cache, tokens, last, start, cfg, chunk)
    else:
        positions = jnp.broadcast_to(jnp.arange(seq, dtype=jnp.int32), (rows, seq))
        if start is not None:
            positions = positions + start[:, None]
        hidden, cache = model.transformer(params, tokens, positions, cache, cfg)
        last_hidden = hidden[jnp.arange(rows), last]
    logits = model.unembed(params, last_hidden, cfg)
    counts = TokenCounts.of(tokens, lengths, count, logits.shape[-1])
    previous = tokens[jnp.arange(rows), last]  # the watermark's context
    adjusted = adjust_logits(logits, sampling, counts, stop_ids, count, bitmask, previous)
    first = sample(adjusted, sampling, count)
    position = lengths if start is None else start + lengths  # where the first token goes
    state = DecodeState.start(first, position, count, max_tokens, stop_ids, sampling, live,
                              counts, last_hidden if features else None)
    return state, cache, logits


def _in_chunks(model, params, cache, tokens: jax.Array, last: jax.Array,
               start: jax.Array | None, cfg: ModelConfig, chunk: int):
    """The model over `tokens` [rows, seq], `chunk` places at a time in a `fori_loop` (one
    compiled chunk whatever seq is): each chunk writes its keys and values, then the next
    attends to them. Returns the final hidden state at each row's `last` place, and the cache.
    Places past a row's prompt (padding) write positions it has not reached yet, as an
    unchunked prefill's padding does; decoding overwrites each before attending to it."""
    rows, seq = tokens.shape
    n = -(-seq // chunk)
    tokens = jnp.pad(tokens, ((0, 0), (0, n * chunk - seq)))
    first = jnp.zeros(rows, jnp.int32) if start is None else start
    places = jnp.arange(chunk, dtype=jnp.int32)

    def body(i, carry):
        cache, kept = carry
        at = i * chunk
        piece = jax.lax.dynamic_slice_in_dim(tokens, at, chunk, axis=1)
        hidden, cache = model.transformer(params, piece, first[:, None] + at + places[None],
                                          cache, cfg)
        here = (last >= at) & (last < at + chunk)
        newest = hidden[jnp.arange(rows), jnp.clip(last - at, 0, chunk - 1)]
        return cache, jnp.where(here[:, None], newest, kept)

    kept = jnp.zeros((rows, cfg.embed_dim), cfg.dtype)  # the final hidden state's shape
    cache, kept = jax.lax.fori_loop(0, n, body, (cache, kept))
    return kept, cache


def step(params, cache, state: DecodeState, cfg: ModelConfig, bitmask: jax.Array | None = None):
    """One decode step for every row: feeds `last` at `position`, samples the next token
    (from the tokens `bitmask` [rows, ceil(vocab / 32)] allows, if given).

    Returns (cache, state, emitted tokens [rows] (NO_TOKEN where a row was done), the fp32
    logits [rows, vocab] the tokens were drawn from).
    """
    model = family(cfg.architecture)
    hidden, cache = model.transformer(params, state.last[:, None], state.position[:, None],
                                      cache, cfg)
    logits = model.unembed(params, hidden, cfg)[:, 0]
    adjusted = adjust_logits(logits, state.sampling, state.counts, state.stop_ids, state.count,
                             bitmask, state.last)
    state, token = state.record(sample(adjusted, state.sampling, state.count))
    if state.feature is not None:
        state.feature = jnp.where((token != NO_TOKEN)[:, None], hidden[:, 0], state.feature)
    return cache, state, token, logits


def speculative_step(params, cache, state: DecodeState, draft: jax.Array, cfg: ModelConfig):
    """One decode step that verifies drafted tokens: feeds `last` and `draft` [rows, k] (the
    tokens proposed to follow it; NO_TOKEN where a row proposes fewer) at the k + 1 positions
    after `position`, in one model call, and appends to each row the longest prefix of its
    draft that agrees with the model plus the token the model picks after it: 1 to k + 1
    tokens, cut at a stop id and at the budget as in `record_many`.

    The token at each place is drawn exactly as `step` would draw it had the drafts before it
    been accepted (`verify_targets`), and a draft is accepted where it equals that token. For
    greedy rows that is the exact-match rule; for sampled rows it is the rejection rule of
    Leviathan et al. / Chen et al. for a deterministic draft (q a point mass on d): d is
    accepted with probability p(d), and on rejection the drawn token is distributed as
    p restricted to tokens other than d, renormalized: normalize(max(p - q, 0)). The emitted
    tokens are therefore those `step` draws from the same (seed, count) keys.

    The keys and values of rejected drafts stay in the cache past the row's new position;
    attention masks by position and the next step overwrites them. No `bitmask`: a grammar's
    allowed tokens depend on the tokens before, so rows under one take plain steps.

    Returns (cache, state, emitted [rows, k + 1] (NO_TOKEN past a row's end), how many each
    row emitted [rows], how many of those were accepted drafts [rows], the fp32 logits
    [rows, k + 1, vocab] of the k + 1 places).
    """
    model = family(cfg.architecture)
    positions = state.position[:, None] + jnp.arange(draft.shape[1] + 1, dtype=jnp.int32)
    hidden, cache = model.transformer(params, _verified_tokens(state, draft), positions, cache,
                                      cfg)
    logits = model.unembed(params, hidden, cfg)
    state, emitted, n, accepted = verify(logits, state, draft)
    if state.feature is not None:  # the newest token was drawn at place n - 1
        newest = jnp.take_along_axis(hidden, jnp.maximum(n - 1, 0)[:, None, None], axis=1)[:, 0]
        state.feature = jnp.where((n > 0)[:, None], newest, state.feature)
    return cache, state, emitted, n, accepted, logits


def verify(logits: jax.Array, state: DecodeState,
           draft: jax.Array) -> tuple[DecodeState, jax.Array, jax.Array, jax.Array]:
    """The acceptance half of `speculative_step`, given the model's logits [rows, k + 1,
    vocab] at `last` and the drafts [rows, k]: returns (state, emitted [rows, k + 1], how many
    [rows], how many of them were accepted drafts [rows])."""
    target = verify_targets(logits, _verified_tokens(state, draft), state)
    agrees = jnp.cumprod(target[:, :-1] == draft, axis=1)  # a NO_TOKEN draft never agrees
    accepted = jnp.sum(agrees, axis=1, dtype=jnp.int32)
    state, emitted, n = state.record_many(target, accepted + 1)
    return state, emitted, n, jnp.minimum(accepted, n)


def _verified_tokens(state: DecodeState, draft: jax.Array) -> jax.Array:
    """[rows, k + 1]: `last`, then the drafts (NO_TOKEN places fed as token 0)."""
    return jnp.concatenate([state.last[:, None], jnp.maximum(draft, 0)], axis=1)


def verify_targets(logits: jax.Array, tokens: jax.Array, state: DecodeState) -> jax.Array:
    """The token `step` would draw at each of the places of `tokens` [rows, width] (`last`,
    then the drafts) from their logits [rows, width, vocab], had every draft before the place
    been accepted: its logits adjusted with the drafts before it counted (penalties), its
    count (min_tokens, and the (seed, count) key of the draw) and the token before it (the
    watermark). Returns [rows, width]."""
    rows, width, vocab = logits.shape
    place = jnp.arange(width, dtype=jnp.int32)
    per_place = lambda x: jnp.repeat(x, width, axis=0)  # noqa: E731 - [rows, ...] -> [rows * width, ...]
    sampling = jax.tree.map(per_place, state.sampling)
    count = (state.count[:, None] + place).reshape(-1)
    counts = None
    if state.counts is not None:  # place j has seen the drafts tokens[:, 1 : j + 1]
        drafts = jax.nn.one_hot(tokens[:, 1:], vocab, dtype=jnp.int32)  # [rows, width - 1, vocab]
        before = jnp.cumsum(jnp.pad(drafts, ((0, 0), (1, 0), (0, 0))), axis=1)
        counts = TokenCounts(output=(state.counts.output[:, None] + before).reshape(-1, vocab),
                             prompt=per_place(state.counts.prompt))
    adjusted = adjust_logits(logits.reshape(-1, vocab), sampling, counts,
                             per_place(state.stop_ids), count, None, tokens.reshape(-1))
    return sample(adjusted, sampling, count).reshape(rows, width)


def prompt_logprobs(params, tokens: jax.Array, *, cfg: ModelConfig) -> TokenLogprobs:
    """Logprobs of a prompt's own tokens (what `echo` with `logprobs` returns): tokens
    [rows, seq] -> TokenLogprobs [rows, seq - 1] of tokens[:, 1:], each under the raw logits
    after the tokens before it. Padding at a row's end changes nothing before it (causal)."""
    rows, seq = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(seq, dtype=jnp.int32), (rows, seq))
    logits, _ = family(cfg.architecture).forward(params, tokens, positions,
                                                 KVCache.init(cfg, rows, seq), cfg)
    logprobs = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
    chosen = jnp.take_along_axis(logprobs, tokens[:, 1:, None], axis=-1)[..., 0]
    top, ids = jax.lax.top_k(logprobs, MAX_TOP_LOGPROBS)
    return TokenLogprobs(chosen, ids.astype(jnp.int32), top)
