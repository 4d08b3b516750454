"""The serving engine: the decode core (jaxinfer.decode) driven over slots and a paged KV cache.

The API follows JetStream's engine_api; the per-slot decode state (`DecodeState` [slots])
lives on the device and passes in and out of each call:

- `prefill(rows) -> Prefix`: runs up to `prefill_batch_size` prompts through the model in one
  call (padded to that many rows and to the prompt-length bucket), writes their keys and
  values into the pages each row brings, and samples each row's first token. A row may start
  at a later position (`PrefillRow.start`) over pages that already hold the positions before:
  a cached prefix, or the earlier chunks of a prompt longer than `chunk` tokens (the largest
  bucket; the scheduler prefills such prompts a chunk per call, decoding between).
- `insert(prefix, state, slot, row=0) -> state`: row `row` of the prefix becomes slot `slot`
  of the decode state (its last token, position, budget, stop ids and sampling parameters).
- `generate(state, page_table, width) -> (state, tokens)`: `decode_steps` steps for slots
  [0, width) in one device call; tokens [width, steps] (NO_TOKEN where a slot was free or
  had finished). `width` is one of `decode_widths`, all compiled by `warmup()`. With
  speculative decoding each step drafts k tokens per slot and verifies them
  (speculative.step): tokens [width, steps * (k + 1)], NO_TOKEN in the places a step did
  not fill, and `last_speculation` counts the call's drafts. Calls with logprobs or a
  grammar's bitmask take plain steps.
- `free(state, slot) -> state` and `move(state, source, target) -> state`: empty a slot, or
  move a running request to a lower slot, so that requests stay packed at the bottom.

Which pages belong to which slot is the scheduler's (`pages.PageTable`); page 0 is scratch,
so free slots and padding write there.

Load-following decode and batch invariance: the scheduler decodes only the smallest width
holding every running request. A request's logits are bitwise the same at every width and
whatever runs beside it, because no operation's per-row arithmetic depends on the number of
rows once the width is at least `min_decode_width()`. On XLA:CPU (jaxlib 0.10) two things
depend on it (measured, see tests/test_serving_engine.py): a one-row dot runs XLA's
matrix-vector kernel, while from 2 rows up YNNPACK keeps each row's reduction order fixed
(checked to 32 rows); and a reduction over fewer than YNN_REDUCE_MIN_ELEMENTS elements is
split by XLA into a reduce-window plus reduce, a different summation order from the YNNPACK
reduction used above it (the attention softmax over [rows, heads, context] and sampling's
softmax over [rows, vocab] are such reductions). So widths start at 2, and at a width where
every such reduction is already on the YNNPACK side; when even all slots are too few, decode
runs at the fixed width of all slots.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxinfer import decode, runtime, speculative
from jaxinfer.cache import PagedKVCache
from jaxinfer.config import ModelConfig
from jaxinfer.decode import NO_TOKEN, DecodeState
from jaxinfer.pallas.blocked import KV_BLOCK
from jaxinfer.runtime import bucket
from jaxinfer.sampling import SamplingArrays, SamplingParams, TokenLogprobs, token_logprobs
from jaxinfer.serving.config import EngineConfig
from jaxinfer.sharding.rules import cache_specs, constrain_cache, model_rules

YNN_REDUCE_MIN_ELEMENTS = 4096  # XLA:CPU hands reductions this large to YNNPACK


def _prefill(params, cache, tokens, lengths, page_rows, sampling, count, max_tokens, stop_ids,
             bitmask, start, history=None, *, cfg: ModelConfig, features: bool = False):
    """Prefills rows into the pages of `page_rows` [rows, pages_per_seq], row r's tokens from
    position start[r] on (its pages hold the positions before: a cached prefix, read only);
    returns their DecodeState [rows], the cache and the first tokens' logprobs. Padding past
    a prompt lands past its last position, where masking by position hides it until decode
    overwrites it (or on scratch page 0). `history` [rows, context]: each row's whole
    sequence, which n-gram drafts look up (None: none); `features`: keep the hidden states
    draft heads read."""
    table = cache.page_table
    state, cache, logits = decode.prefill(
        params, dataclasses.replace(cache, page_table=page_rows), tokens, lengths, sampling,
        count, max_tokens, stop_ids, bitmask=bitmask, cfg=cfg, start=start, features=features)
    if history is not None:
        state = state.with_history(history)
    logprobs = token_logprobs(logits, state.last, sampling)
    return state, constrain_cache(dataclasses.replace(cache, page_table=table), cfg), logprobs


def _speculative_decode(params, cache, state: DecodeState, page_table, *, cfg: ModelConfig,
                        steps: int, k: int, method: str):
    """`steps` speculative steps (speculative.step, `k` drafts each by `method`) for the first
    `len(page_table)` rows of `state`. Returns the new state, tokens [width, steps * (k + 1)]
    (NO_TOKEN where a step emitted fewer), the cache, and counts int32 [3 + k]: steps with a
    draft, draft tokens, accepted tokens, then the drafts accepted at each draft position."""
    width = page_table.shape[0]
    rows = jax.tree.map(lambda x: x[:width], state)
    table = cache.page_table

    def body(carry, _):
        cache, rows = carry
        cache, rows, emitted, _, proposed, accepted = speculative.step(params, cache, rows, k,
                                                                       cfg, method)
        per_position = jnp.sum(accepted[:, None] > jnp.arange(k)[None], axis=0)
        counts = jnp.concatenate([jnp.stack([jnp.sum(proposed > 0), jnp.sum(proposed),
                                             jnp.sum(accepted)]), per_position])
        return (cache, rows), (emitted, counts.astype(jnp.int32))

    carry = (dataclasses.replace(cache, page_table=page_table), rows)
    (cache, rows), (tokens, counts) = jax.lax.scan(body, carry, None, length=steps)
    state = jax.tree.map(lambda x, r: x.at[:width].set(r), state, rows)
    cache = constrain_cache(dataclasses.replace(cache, page_table=table), cfg)
    return state, tokens.swapaxes(0, 1).reshape(width, -1), cache, jnp.sum(counts, axis=0)


def _decode(params, cache, state: DecodeState, page_table, bitmask, steps, *,
            cfg: ModelConfig, max_steps: int, logits: bool = False):
    """`steps` (a traced int32, 1 to `max_steps`) decode steps for the first
    `len(page_table)` rows of `state` (the width), each drawing from the tokens `bitmask`
    [width, ceil(vocab / 32)] allows (all bits set: any). One program serves every step
    count up to `max_steps`: structured output's one-step calls run on decode_steps' program.

    Returns the new state, tokens [width, max_steps] (NO_TOKEN past `steps`), the cache, the
    tokens' TokenLogprobs [width, max_steps, ...] (zeros unless a row asked for logprobs, and
    past `steps`), and (with `logits`) the logits [width, max_steps, vocab] each token was
    drawn from.
    """
    width = page_table.shape[0]
    rows = jax.tree.map(lambda x: x[:width], state)
    table = cache.page_table
    tokens = jnp.full((max_steps, width), NO_TOKEN, jnp.int32)
    logprobs = TokenLogprobs.zeros((max_steps, width))
    all_logits = jnp.zeros((max_steps, width, cfg.vocab_size), jnp.float32) if logits else None

    def body(i, carry):
        cache, rows, tokens, logprobs, all_logits = carry
        sampling = rows.sampling
        cache, rows, token, step_logits = decode.step(params, cache, rows, cfg, bitmask)
        put = lambda buffer, x: jax.lax.dynamic_update_index_in_dim(  # noqa: E731
            buffer, x.astype(buffer.dtype), i, 0)
        logprobs = jax.tree.map(put, logprobs, token_logprobs(step_logits, token, sampling))
        if logits:
            all_logits = put(all_logits, step_logits)
        return cache, rows, put(tokens, token), logprobs, all_logits

    carry = (dataclasses.replace(cache, page_table=page_table), rows, tokens, logprobs,
             all_logits)
    cache, rows, tokens, logprobs, all_logits = jax.lax.fori_loop(0, steps, body, carry)
    state = jax.tree.map(lambda x, r: x.at[:width].set(r), state, rows)
    cache = constrain_cache(dataclasses.replace(cache, page_table=table), cfg)
    logprobs = jax.tree.map(lambda x: x.swapaxes(0, 1), logprobs)
    return (state, tokens.T, cache, logprobs,
            None if all_logits is None else all_logits.swapaxes(0, 1))


@functools.partial(jax.jit, donate_argnames=("state",))
def _set_row(state: DecodeState, slot, rows: DecodeState, row):
    """Slot `slot` of `state` := row `row` of `rows`."""
    return jax.tree.map(lambda x, r: x.at[slot].set(r[row]), state, rows)


@functools.partial(jax.jit, donate_argnames=("state",))
def _move_row(state: DecodeState, source, target, free: DecodeState):
    """Slot `target` := slot `source`, then slot `source` := the one-row `free` state."""
    state = jax.tree.map(lambda x: x.at[target].set(x[source]), state)
    return jax.tree.map(lambda x, r: x.at[source].set(r[0]), state, free)


@functools.partial(jax.jit, donate_argnames=("cache",))
def _write_page(cache: PagedKVCache, page, data: tuple):
    """Pool page `page` := `data`, one page of each of k, v (and their scales)."""
    fields = [f for f in _PAGE_FIELDS if getattr(cache, f) is not None]
    return dataclasses.replace(cache, **{
        f: getattr(cache, f).at[:, :, page].set(x.astype(getattr(cache, f).dtype))
        for f, x in zip(fields, data, strict=True)})


_PAGE_FIELDS = ("k_pages", "v_pages", "k_scales", "v_scales")
_prefill_jit = jax.jit(_prefill, static_argnames=("cfg", "features"),
                      donate_argnames=("cache",))
_prompt_logprobs_jit = jax.jit(decode.prompt_logprobs, static_argnames=("cfg",))
_decode_jit = jax.jit(_decode, static_argnames=("cfg", "max_steps", "logits"),
                      donate_argnames=("cache", "state"))
_speculative_decode_jit = jax.jit(_speculative_decode,
                                  static_argnames=("cfg", "steps", "k", "method"),
                                  donate_argnames=("cache", "state"))


def compiled_programs() -> int:
    """How many serving programs this process has compiled (prefill buckets, decode widths,
    row updates)."""
    return runtime.compiled_programs(_prefill_jit, _decode_jit, _speculative_decode_jit,
                                     _set_row, _move_row)


@dataclasses.dataclass
class PrefillRow:
    """One prompt to prefill: its tokens, the pages that will hold them, how to sample and stop.

    With `start` > 0, `tokens` are the sequence's tokens from position `start` on, and the
    first start // page_size of `pages` already hold the positions before (a cached prefix).
    """

    tokens: Sequence[int]
    pages: Sequence[int]
    sampling: SamplingParams = SamplingParams()
    count: int = 0  # tokens this request generated before (a resumed, preempted request)
    max_tokens: int = 1  # the request's whole token budget (count included)
    stop_ids: Sequence[int] = ()
    bitmask: np.ndarray | None = None  # [ceil(vocab / 32)] int32: tokens the first may be
    start: int = 0  # the position of tokens[0]
    before: Sequence[int] = ()  # the tokens before `start`, where speculation's drafts look too


@dataclasses.dataclass
class Prefix:
    """What `prefill` returns: each row's first token (host) and decode state (device)."""

    tokens: list[int]
    state: DecodeState  # [prefill_batch_size] rows; rows past len(tokens) are padding
    logprobs: TokenLogprobs | None = None  # of `tokens`, on the host (zeros unless asked)


class Engine:
    """The decode core over slots and a paged KV cache; see the module docstring for the API.

    `model`: anything with `config` (ModelConfig), `params` and `tokenizer`, such as what
    `jaxinfer.load_model` returns; `params` may be jax.ShapeDtypeStructs (`api.weight_shapes`),
    so that warm-up compiles while the weights load, which `use_params` then hands in.
    `mesh`: a jax Mesh the params are already sharded over; the KV pool is then split like
    the model, else it lives on the default device.
    """

    def __init__(self, model: Any, config: EngineConfig | None = None, mesh=None):
        self.config = config = config or EngineConfig()
        self.model_config = cfg = model.config
        self.params, self.tokenizer, self.mesh = model.params, model.tokenizer, mesh
        self.slots, self.steps = config.max_batch_size, config.decode_steps
        self.draft_tokens = config.draft_tokens  # k: drafted per slot and step (0: none)
        speculative.check_options(config.speculative_method, config.num_speculative_tokens,
                                  self.params)
        # The most positions past a slot's newest token that one generate() call writes.
        self.positions_per_call = self.steps * (self.draft_tokens + 1)
        self.last_speculation = np.zeros(3 + self.draft_tokens, np.int64)  # see generate()
        self.context = config.context(cfg)
        self.page_size = config.page_size
        self.pages_per_seq = config.pages_per_seq(cfg)
        self.num_pages = config.pool_pages(cfg)
        self.chunk = config.prefill_chunk(cfg)  # the longest prefill row
        self.buckets = prefill_buckets(config.min_prefill_bucket, self.chunk)
        self.cache = PagedKVCache.init(cfg, self.num_pages, self.page_size, self.slots,
                                       self.pages_per_seq)
        if mesh is not None:  # the pool is split like the model: over kv_heads or head_dim
            specs = cache_specs(self.cache, model_rules(cfg, mesh))
            self.cache = jax.device_put(self.cache, jax.tree.map(
                lambda spec: jax.sharding.NamedSharding(mesh, spec), specs,
                is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec)))
        widest = self.slots
        self.decode_widths = [w for w in (1 << i for i in range(widest.bit_length()))
                              if self.min_decode_width() <= w < widest] + [widest]

    def use_params(self, params) -> None:
        """Runs on `params` from now on: weights of the shapes and placement the engine was
        built with, such as `load_model`'s after warm-up compiled on `api.weight_shapes`."""
        if runtime.signature(params) != runtime.signature(self.params):
            raise ValueError("these params differ in structure, shape, dtype or placement from "
                             "the ones the engine was built with; build an Engine for them")
        self.params = params

    # -- the engine calls ---------------------------------------------------------------------

    def init_state(self) -> DecodeState:
        """The decode state of `slots` free slots."""
        return self._empty_state(self.slots)

    def _empty_state(self, rows: int) -> DecodeState:
        method, cfg = self.config.speculative_method, self.model_config
        return DecodeState.empty(rows, self.config.max_stop_token_ids, cfg.vocab_size,
                                 self._history,
                                 (cfg.embed_dim, cfg.dtype) if method == "draft" else None)

    @property
    def _history(self) -> int | None:
        """Positions of the token history each slot keeps (None: no n-gram drafts)."""
        return self.context if self.config.speculative_method == "ngram" else None

    @property
    def _prefill_static(self) -> dict:
        return {"cfg": self.model_config, "features": self.config.speculative_method == "draft"}

    @property
    def _speculative_static(self) -> dict:
        return {"cfg": self.model_config, "k": self.draft_tokens,
                "method": self.config.speculative_method}

    def prefill(self, rows: Sequence[PrefillRow]) -> Prefix:
        """Runs the prompts (at most prefill_batch_size) into their pages; see the module doc."""
        width = self.config.prefill_batch_size
        if not 0 < len(rows) <= width:
            raise ValueError(f"prefill takes 1 to {width} prompts; got {len(rows)}")
        longest = max(len(r.tokens) for r in rows)
        if (end := max(r.start + len(r.tokens) for r in rows)) > self.context:
            raise ValueError(f"prompt has {end} tokens; this server's context is "
                             f"{self.context}")
        if any(not r.tokens for r in rows):
            raise ValueError("a prefill row has no tokens; it needs at least one")
        if longest > self.chunk:
            raise ValueError(f"a prefill row has {longest} tokens; one call takes at most "
                             f"{self.chunk} (max_num_batched_tokens): prefill it in chunks")
        stops = self.config.max_stop_token_ids
        if too_many := [len(r.stop_ids) for r in rows if len(r.stop_ids) > stops]:
            raise ValueError(f"{too_many[0]} stop ids; at most {stops}")
        seq = self.bucket(longest)
        tokens = np.zeros((width, seq), np.int32)
        lengths = np.ones(width, np.int32)
        page_rows = np.zeros((width, self.pages_per_seq), np.int32)
        count = np.zeros(width, np.int32)
        max_tokens = np.ones(width, np.int32)
        stop_ids = np.full((width, stops), NO_TOKEN, np.int32)
        bitmask = self.any_token(width)
        start = np.zeros(width, np.int32)
        for i, row in enumerate(rows):
            tokens[i, : len(row.tokens)] = row.tokens
            lengths[i] = len(row.tokens)
            page_rows[i, : len(row.pages)] = row.pages
            count[i], max_tokens[i] = row.count, row.max_tokens
            stop_ids[i, : len(row.stop_ids)] = list(row.stop_ids)
            if row.bitmask is not None:
                bitmask[i] = row.bitmask
            start[i] = row.start
        sampling = [r.sampling for r in rows] + [SamplingParams()] * (width - len(rows))
        history = None
        if self._history is not None:
            history = np.zeros((width, self.context), np.int32)
            for i, row in enumerate(rows):
                before = list(row.before)[: row.start]
                history[i, : len(before)] = before
                history[i, row.start: row.start + len(row.tokens)] = row.tokens
        state, logprobs = self._prefill(tokens, lengths, page_rows,
                                        SamplingArrays.stack(sampling), count, max_tokens,
                                        stop_ids, bitmask, start, history)
        logprobs = jax.tree.map(np.asarray, logprobs) if any(
            r.sampling.logprobs is not None for r in rows) else None
        return Prefix(np.asarray(state.last)[: len(rows)].tolist(), state, logprobs)

    def insert(self, prefix: Prefix, state: DecodeState, slot: int, row: int = 0) -> DecodeState:
        """Row `row` of `prefix` becomes slot `slot` of `state`."""
        return self._run(_set_row, (state, np.int32(slot), prefix.state, np.int32(row)), {},
                         "insert")

    def generate(self, state: DecodeState, page_table: np.ndarray, width: int | None = None,
                 *, logits: bool = False, logprobs: bool = False,
                 bitmask: np.ndarray | None = None, steps: int | None = None):
        """decode_steps steps for slots [0, width) (default: all); `page_table` holds at least
        `width` rows. Returns (state, tokens [width, steps]), then with `logprobs` the tokens'
        TokenLogprobs [width, steps, ...] on the host (the same program: rows that asked for
        logprobs get them computed), and with `logits` the logits [width, steps, vocab] (a
        program of its own, not compiled by warm-up). `bitmask` [width, ceil(vocab / 32)]:
        the tokens each slot may draw (default: any); `steps`: fewer steps than decode_steps
        (1 while a structured-output request runs, whose mask holds for one token), on the
        same program.

        With speculative decoding, a call without logprobs, logits or bitmask speculates:
        tokens [width, steps * (k + 1)], and `last_speculation` [3 + k] counts its steps
        with a draft, draft tokens, accepted tokens and accepted drafts per position."""
        width = width or self.slots
        if width not in self.decode_widths:
            raise ValueError(f"decode width {width}; compiled widths are {self.decode_widths}")
        steps = steps or self.steps
        if not 1 <= steps <= self.steps:
            raise ValueError(f"steps={steps}; a decode call takes 1 to decode_steps="
                             f"{self.steps} steps")
        if self.draft_tokens and bitmask is None and not (logits or logprobs):
            args = (self.params, self.cache, state, np.asarray(page_table[:width], np.int32))
            static = {**self._speculative_static, "steps": steps}
            state, tokens, self.cache, counts = self._run(
                _speculative_decode_jit, args, static,
                f"speculative decode ({width} slots x {steps} steps, {self.draft_tokens} drafts)")
            self.last_speculation = np.asarray(counts, np.int64)
            return state, np.asarray(tokens)
        self.last_speculation = np.zeros_like(self.last_speculation)
        bitmask = self.any_token(width) if bitmask is None else bitmask
        args = (self.params, self.cache, state, np.asarray(page_table[:width], np.int32),
                bitmask, np.int32(steps))
        state, tokens, self.cache, step_logprobs, all_logits = self._run(
            _decode_jit, args, self._decode_static(logits), self._decode_name(width))
        out = (state, np.asarray(tokens)[:, :steps])
        if logprobs:
            out += (jax.tree.map(lambda x: np.asarray(x)[:, :steps], step_logprobs),)
        return (*out, np.asarray(all_logits)[:, :steps]) if logits else out

    def free(self, state: DecodeState, slot: int) -> DecodeState:
        """Empties `slot`: it stops emitting (its pages are the scheduler's to release)."""
        return self.insert(self._free_row, state, slot)

    def move(self, state: DecodeState, source: int, target: int) -> DecodeState:
        """Slot `target` takes over slot `source`'s request; `source` becomes free."""
        args = (state, np.int32(source), np.int32(target), self._free_row.state)
        return self._run(_move_row, args, {}, "move")

    def prompt_logprobs(self, tokens: Sequence[int]) -> TokenLogprobs:
        """TokenLogprobs [len(tokens) - 1] (host) of tokens[1:], each after those before it:
        one forward over a dense cache of the prompt's bucket, outside the slots (thread-safe;
        a program per bucket, compiled on first use, not by warm-up)."""
        seq = self.bucket(len(tokens))
        padded = np.zeros((1, seq), np.int32)
        padded[0, : len(tokens)] = tokens
        logprobs = self._run(_prompt_logprobs_jit, (self.params, padded),
                             {"cfg": self.model_config}, f"prompt logprobs (1 x {seq})")
        return jax.tree.map(lambda x: np.asarray(x)[0, : len(tokens) - 1], logprobs)

    def any_token(self, rows: int) -> np.ndarray:
        """A bitmask [rows, ceil(vocab / 32)] int32 allowing every token."""
        return np.full((rows, -(-self.model_config.vocab_size // 32)), -1, np.int32)

    def read_pages(self, page: int, memory_kind: str = "pinned_host") -> tuple[jax.Array, ...]:
        """Pool page `page` copied into `memory_kind` memory: k, v (and their scales), each
        [layers, kv_heads, page_size, ...] (for the host tier of pages.HostTier)."""
        pools = [getattr(self.cache, f) for f in _PAGE_FIELDS if getattr(self.cache, f) is not None]
        pages = [pool[:, :, page] for pool in pools]
        return tuple(jax.device_put(x, x.sharding.with_memory_kind(memory_kind)) for x in pages)

    def write_pages(self, page: int, data: tuple[jax.Array, ...]) -> None:
        """Pool page `page` := `data`, as `read_pages` returned it."""
        kind = self.cache.k_pages.sharding.memory_kind  # the pool's own (device) memory
        on_device = tuple(jax.device_put(x, x.sharding.with_memory_kind(kind)) for x in data)
        self.cache = self._run(_write_page, (self.cache, np.int32(page), on_device), {},
                               "write a KV page")

    def decode_width(self, running: int) -> int:
        """The narrowest compiled width holding `running` requests packed from slot 0."""
        return next(w for w in self.decode_widths if w >= running)

    def min_decode_width(self) -> int:
        """The narrowest width at which each row's numerics no longer depend on the width
        (see the module docstring): at least 2 rows, and enough rows that the attention
        softmax and the sampling softmax reduce over YNN_REDUCE_MIN_ELEMENTS or more."""
        cfg = self.model_config
        # CPU attention reads the cache a block at a time (pallas.blocked): its softmax
        # reduces over one block of positions per head.
        context = min(self.pages_per_seq * self.page_size, KV_BLOCK)
        per_row = min(cfg.n_heads * context, cfg.vocab_size)
        return bucket(-(-YNN_REDUCE_MIN_ELEMENTS // per_row), minimum=2)

    # -- compilation --------------------------------------------------------------------------

    def bucket(self, length: int) -> int:
        """The prompt-length bucket a prompt of `length` tokens is padded to."""
        return bucket(length, self.config.min_prefill_bucket, self.chunk)

    def warmup(self, progress: bool = False) -> None:
        """Compiles (or reads from the persistent cache) every prefill bucket, every decode
        width (one program for 1 to `decode_steps` steps: structured output takes one per
        call) and the row updates, so serving never compiles. On one device nothing runs;
        under a mesh each runs once, writing only to the scratch page, because its outputs'
        shardings are what the next program is compiled for. One after another: two to four
        threads compiling at once took 97-108% of the time on 2 cores (tracing and lowering,
        70% of it, hold the GIL); they ran without the crash an earlier attempt saw."""
        width, stops = self.config.prefill_batch_size, self.config.max_stop_token_ids
        run = self.mesh is not None
        programs = []  # (jitted, args, static, what) to compile
        for seq in self.buckets:  # rows of budget 1 are done at once
            inputs = (np.zeros((width, seq), np.int32), np.ones(width, np.int32),
                      np.zeros((width, self.pages_per_seq), np.int32),
                      SamplingArrays.stack([SamplingParams()] * width), np.zeros(width, np.int32),
                      np.ones(width, np.int32), np.full((width, stops), NO_TOKEN, np.int32),
                      self.any_token(width), np.zeros(width, np.int32),
                      None if self._history is None else np.zeros((width, self._history),
                                                                   np.int32))
            if run:
                prefix, _ = self._prefill(*inputs, progress=progress)
            else:
                programs.append((_prefill_jit, (self.params, self.cache, *inputs),
                                 self._prefill_static, f"prefill ({width} x {seq})"))
        table = np.zeros((self.slots, self.pages_per_seq), np.int32)
        if run:
            state = self.insert(Prefix([0] * width, prefix), self.init_state(), 0)
            state = self.free(self.move(state, 0, self.slots - 1), self.slots - 1)
            for w in self.decode_widths:
                state, _ = self.generate(state, table, w)
            jax.block_until_ready(self.cache)
            return
        state = self.init_state()
        prefix = self._empty_state(width)  # in shape
        programs += [(_set_row, (state, np.int32(0), prefix, np.int32(0)), {}, "insert"),
                     (_move_row, (state, np.int32(0), np.int32(1), self._free_row.state), {},
                      "move")]
        for w in self.decode_widths:
            programs.append((_decode_jit, (self.params, self.cache, state, table[:w],
                                           self.any_token(w), np.int32(self.steps)),
                             self._decode_static(False), self._decode_name(w)))
        for w in self.decode_widths if self.draft_tokens else ():
            static = {**self._speculative_static, "steps": self.steps}
            programs.append((_speculative_decode_jit, (self.params, self.cache, state, table[:w]),
                             static, f"speculative decode ({w} slots x {self.steps} steps)"))
        for program in programs:
            self._compiled(*program, progress)

    def _decode_static(self, logits: bool) -> dict:
        return {"cfg": self.model_config, "max_steps": self.steps, "logits": logits}

    def _decode_name(self, width: int) -> str:
        return f"decode ({width} slots x 1 to {self.steps} steps)"

    @functools.cached_property
    def _free_row(self) -> Prefix:
        return Prefix([], self._empty_state(1))

    def _prefill(self, *inputs, progress: bool = False) -> tuple[DecodeState, TokenLogprobs]:
        seq = inputs[0].shape[1]
        state, self.cache, logprobs = self._run(
            _prefill_jit, (self.params, self.cache, *inputs), self._prefill_static,
            f"prefill ({inputs[0].shape[0]} x {seq})", progress)
        return state, logprobs

    def _compiled(self, jitted, args, static, what, progress=False):
        return runtime.compiled(jitted, args, static, what, mesh=self.mesh, progress=progress)

    def _run(self, jitted, args, static, what, progress=False):
        return runtime.run(jitted, args, static, what, mesh=self.mesh, progress=progress,
                           eager=self.config.eager)


def prefill_buckets(minimum: int, context: int) -> list[int]:
    """Prompt-length buckets: powers of two from `minimum`, the last one capped at `context`."""
    sizes, size = [], bucket(1, minimum, context)
    while True:
        sizes.append(size)
        if size >= context:
            return sizes
        size = min(size * 2, context)
