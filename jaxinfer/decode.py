"""The one decode core: per-row decode state, the prefill of a set of rows, and one decode step.

`generate()` drives it over a dense cache with `lax.while_loop`; the serving engine drives it
`decode_steps` steps per device call over the paged cache. Both draw random numbers one way,
keyed on (request seed, tokens generated so far), so a seeded request gives the same tokens
through either, in any row.

    first, cache = prefill(params, cache, tokens, lengths, sampling, count, cfg=cfg)
    state = DecodeState.start(first, lengths, count, max_tokens, stop_ids, sampling)
    cache, state, token, logits = step(params, cache, state, cfg)  # until all(state.done)
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxinfer.config import ModelConfig
from jaxinfer.models import family
from jaxinfer.sampling import SamplingArrays, SamplingParams, sample

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

    @classmethod
    def start(cls, first: jax.Array, position: jax.Array, count: jax.Array,
              max_tokens: jax.Array, stop_ids: jax.Array, sampling: SamplingArrays,
              live: jax.Array | bool = True) -> DecodeState:
        """Rows that just sampled `first` at `position` (the prompt length) after `count`
        earlier tokens; rows where `live` is False start done (padding, free slots)."""
        hit_stop = jnp.any(first[:, None] == stop_ids, axis=-1)
        count = count + 1
        return cls(last=first, position=position, count=count, max_tokens=max_tokens,
                   done=hit_stop | (count >= max_tokens) | ~jnp.asarray(live),
                   stopped=hit_stop, stop_ids=stop_ids, sampling=sampling)

    @classmethod
    def empty(cls, rows: int, stops: int) -> DecodeState:
        """`rows` free rows (all done), with room for `stops` stop ids each."""
        zeros = lambda: jnp.zeros(rows, jnp.int32)  # noqa: E731 - distinct (donatable) buffers
        sampling = jax.tree.map(jnp.asarray, SamplingArrays.stack([SamplingParams()] * rows))
        return cls(last=zeros(), position=zeros(), count=zeros(), max_tokens=zeros(),
                   done=jnp.ones(rows, bool), stopped=jnp.zeros(rows, bool),
                   stop_ids=jnp.full((rows, stops), NO_TOKEN, jnp.int32), sampling=sampling)

    def record(self, token: jax.Array) -> tuple[DecodeState, jax.Array]:
        """Appends `token` [rows] to every unfinished row; returns the new state and what each
        row emitted (NO_TOKEN where it was done already)."""
        live = ~self.done
        token = jnp.where(live, token, NO_TOKEN)
        hit_stop = live & jnp.any(token[:, None] == self.stop_ids, axis=-1)
        count = self.count + live
        state = dataclasses.replace(
            self,
            last=jnp.where(live, token, self.last),
            position=self.position + live,
            count=count,
            done=self.done | hit_stop | (count >= self.max_tokens),
            stopped=self.stopped | hit_stop,
        )
        return state, token


def prefill(params, cache, tokens: jax.Array, lengths: jax.Array, sampling: SamplingArrays,
            count: jax.Array, *, cfg: ModelConfig, start: jax.Array | None = None):
    """Runs prompts `tokens` [rows, seq] (row r's in its first lengths[r] places) through the
    model, writing their keys and values into `cache`, and samples each row's first token.

    `count` [rows]: tokens a row generated before (a resumed request), which keys its draw.
    `start` [rows] (default 0): the position of each row's first token; the cache already
    holds the row's earlier positions (a cached prefix, or earlier chunks), which the tokens
    attend to. Returns (first tokens [rows], cache).
    """
    model = family(cfg.architecture)
    rows, seq = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(seq, dtype=jnp.int32), (rows, seq))
    if start is not None:
        positions = positions + start[:, None]
    hidden, cache = model.transformer(params, tokens, positions, cache, cfg)
    last_hidden = hidden[jnp.arange(rows), jnp.maximum(lengths - 1, 0)]
    logits = model.unembed(params, last_hidden, cfg)
    return sample(logits, sampling, count), cache


def step(params, cache, state: DecodeState, cfg: ModelConfig):
    """One decode step for every row: feeds `last` at `position`, samples the next token.

    Returns (cache, state, emitted tokens [rows] (NO_TOKEN where a row was done), the fp32
    logits [rows, vocab] the tokens were drawn from).
    """
    logits, cache = family(cfg.architecture).forward(
        params, state.last[:, None], state.position[:, None], cache, cfg)
    logits = logits[:, 0]
    state, token = state.record(sample(logits, state.sampling, state.count))
    return cache, state, token, logits
