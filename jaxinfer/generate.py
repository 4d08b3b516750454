"""generate(): one jitted prefill, then every new token in one jitted `lax.while_loop`.

Both drive the decode core (jaxinfer.decode) over a dense KV cache. Batch size, prompt length
and the number of new tokens are padded to power-of-two buckets; each compiled program is
keyed by its bucket (jaxinfer.runtime), so calls within a bucket reuse it. With speculative
decoding on, each loop step drafts up to k tokens per row (jaxinfer.speculative) and verifies
them in one model call (decode.speculative_step).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxinfer import decode, runtime, speculative
from jaxinfer.cache import KVCache
from jaxinfer.config import ModelConfig
from jaxinfer.decode import NO_TOKEN, DecodeState
from jaxinfer.runtime import bucket, enable_compilation_cache  # noqa: F401 (re-exported)
from jaxinfer.sampling import SamplingArrays, SamplingParams
from jaxinfer.sharding import rules as sharding_rules

MIN_SEQ_BUCKET = 16
PREFILL_CHUNK = 512  # as the server's max_num_batched_tokens


@dataclasses.dataclass
class GenerateResult:
    """Per row: generated ids (a stop token that ended the row included), count, why it ended;
    and how the decode loop got there."""

    tokens: list[list[int]]
    lengths: list[int]
    prompt_lengths: list[int]
    finish_reasons: list[str]  # "stop" (a stop token) or "length" (max_new_tokens)
    timings: dict[str, float]  # seconds: compile (0 when cached), prefill, decode
    decode_steps: int = 0  # model calls after the prefill (one per loop step)
    draft_tokens: list[int] = dataclasses.field(default_factory=list)  # per row: proposed
    accepted_tokens: list[int] = dataclasses.field(default_factory=list)  # per row: kept
    # return_logits=True: per row, the fp32 logits [length, vocab] each generated token was
    # drawn from (before the sampler's penalties, masks and temperature); else None.
    logits: list[np.ndarray] | None = None


def _prefill(params, tokens, prompt_lens, sampling, stop_ids, max_new, *, cfg, cache_len,
             features=False, chunk=None):
    """Prefills the prompts [batch, seq] into a new dense cache, `chunk` positions at a time;
    rows of length 0 (padding of the batch bucket) start done. `features`: keep the hidden
    states draft heads read."""
    batch = tokens.shape[0]
    cache = sharding_rules.constrain_cache(KVCache.init(cfg, batch, cache_len), cfg)
    count = jnp.zeros(batch, jnp.int32)
    max_tokens = jnp.full(batch, max_new, jnp.int32)
    return decode.prefill(params, cache, tokens, prompt_lens, sampling, count, max_tokens,
                          stop_ids, prompt_lens > 0, cfg=cfg, features=features, chunk=chunk)


def _logits_buffer(first_logits, out_len: int, keep: bool):
    """[batch, out_len, vocab] holding the prefill's logits in column 0 (None unless `keep`)."""
    if not keep:
        return None
    batch, vocab = first_logits.shape
    return jnp.zeros((batch, out_len, vocab), jnp.float32).at[:, 0].set(first_logits)


def _decode(params, cache, state: DecodeState, first_logits, *, cfg, out_len, keep_logits):
    """Steps until every row is done; returns the final state, tokens [batch, out_len]
    (NO_TOKEN past a row's end; the prefill's first token in column 0), the cache, and with
    `keep_logits` the logits each token was drawn from [batch, out_len, vocab] (else None)."""
    tokens = jnp.full((state.last.shape[0], out_len), NO_TOKEN, jnp.int32)
    tokens = tokens.at[:, 0].set(state.last)
    kept = _logits_buffer(first_logits, out_len, keep_logits)

    def cond(carry):
        _, state, _, _, step = carry
        return (step < out_len) & ~jnp.all(state.done)

    def body(carry):
        cache, state, tokens, kept, step = carry
        cache, state, token, logits = decode.step(params, cache, state, cfg)
        if kept is not None:
            kept = jax.lax.dynamic_update_index_in_dim(kept, logits, step, 1)
        tokens = jax.lax.dynamic_update_index_in_dim(tokens, token, step, 1)
        return cache, state, tokens, kept, step + 1

    cache, state, tokens, kept, _ = jax.lax.while_loop(cond, body, (cache, state, tokens, kept,
                                                                     jnp.int32(1)))
    return state, tokens, cache, kept  # the cache, donated, is updated in place


def _speculative_decode(params, cache, state: DecodeState, first_logits, prompts, *, cfg,
                        out_len, keep_logits, k, method):
    """`_decode` with up to `k` drafts verified per step (speculative.step), each row drafting
    with `method`: "ngram" looks them up in `prompts` [batch, seq] and its output so far,
    "draft" asks the draft heads. Also returns the steps taken (the prefill's included) and
    per row the draft tokens proposed and accepted."""
    batch = state.last.shape[0]
    rows, place = jnp.arange(batch)[:, None], jnp.arange(k + 1)[None]
    tokens = jnp.full((batch, out_len), NO_TOKEN, jnp.int32).at[:, 0].set(state.last)
    kept = _logits_buffer(first_logits, out_len, keep_logits)
    if method == "ngram":
        state = state.with_history(jnp.pad(prompts, ((0, 0),
                                                     (0, cache.max_len - prompts.shape[1]))))
    zeros = jnp.zeros(batch, jnp.int32)

    def cond(carry):
        _, state, _, _, step, _, _ = carry
        return (step < out_len) & ~jnp.all(state.done)

    def body(carry):
        cache, state, tokens, kept, step, drafted, accepted = carry
        start = state.count  # the emitted tokens' columns start here
        cache, state, emitted, n, proposed, taken, *logits = speculative.step(
            params, cache, state, k, cfg, method, with_logits=keep_logits)
        columns = jnp.where(place < n[:, None], start[:, None] + place, out_len)  # else dropped
        tokens = tokens.at[rows, columns].set(emitted, mode="drop")
        if keep_logits:
            kept = kept.at[rows, columns].set(logits[0], mode="drop")
        return cache, state, tokens, kept, step + 1, drafted + proposed, accepted + taken

    carry = (cache, state, tokens, kept, jnp.int32(1), zeros, zeros)
    cache, state, tokens, kept, steps, drafted, accepted = jax.lax.while_loop(cond, body, carry)
    return state, tokens, cache, kept, steps, drafted, accepted


_prefill_jit = jax.jit(_prefill, static_argnames=("cfg", "cache_len", "features", "chunk"))
_decode_jit = jax.jit(_decode, static_argnames=("cfg", "out_len", "keep_logits"),
                      donate_argnames=("cache",))
_speculative_decode_jit = jax.jit(_speculative_decode,
                                  static_argnames=("cfg", "out_len", "keep_logits", "k",
                                                   "method"),
                                  donate_argnames=("cache",))


def compiled_programs() -> int:
    """How many programs generate() has compiled in this process (one per bucket and step)."""
    return runtime.compiled_programs(_prefill_jit, _decode_jit, _speculative_decode_jit)


def generate(
    params,
    tokens: Sequence[Sequence[int]],
    cfg: ModelConfig,
    *,
    max_new_tokens: int = 256,
    sampling: SamplingParams | Sequence[SamplingParams] | None = None,
    stop_token_ids: Sequence[int] = (),
    mesh: jax.sharding.Mesh | None = None,
    eager: bool = False,
    speculative_method: str = "none",
    num_speculative_tokens: int = 4,
    prefill_chunk: int = PREFILL_CHUNK,
    return_logits: bool = False,
) -> GenerateResult:
    """Generates up to `max_new_tokens` tokens after each prompt in `tokens` (a list of id lists).

    A row ends at the first token in `stop_token_ids` (pass the tokenizer's `stop_ids`; a row
    whose SamplingParams say `ignore_eos` ignores them) or after `max_new_tokens` tokens.
    `sampling` is one SamplingParams for every row or one per row; the default is greedy.

    `mesh`: run sharded over this mesh (default: the mesh `params` are placed on, e.g. by
    `load_model(mesh=...)`); params are moved onto their shardings if they are not there.
    Results are gathered to every process.

    `eager`: run the same code op by op under `jax.disable_jit()` (nothing compiled), to step
    through the model in a debugger; see the README for what it costs.

    `speculative_method="ngram"`: each step drafts up to `num_speculative_tokens` (1..7)
    tokens per row by prompt lookup (jaxinfer.speculative) and verifies them in one model
    call; "draft": the draft heads in `params["draft"]` (load_model(..., draft=PATH)) draft
    them; greedy rows get the same tokens as without (up to the last bits of the logits: the
    verifying call has another shape) and seeded rows the same draws from the same keys. The
    result's decode_steps, draft_tokens and accepted_tokens say how much it saved.

    `prefill_chunk`: prompts longer than this many tokens are prefilled that many at a time,
    each chunk attending to the cache the earlier ones wrote, so prompts up to the model's
    whole context need only one chunk's activations (logits within rounding of one
    unchunked prefill: the products have other shapes).

    `return_logits`: also return the logits each token was drawn from (GenerateResult.logits;
    the program then keeps [rows, new tokens, vocab] fp32 of them).
    """
    speculative.check_options(speculative_method, num_speculative_tokens, params)
    _check_chunk(prefill_chunk)
    placed_on = sharding_rules.mesh_of(params)
    mesh = mesh or placed_on
    batch = _Batch.of(tokens, cfg, max_new_tokens, sampling, stop_token_ids,
                      data=mesh.shape["data"] if mesh is not None else 1, chunk=prefill_chunk)
    if mesh is not None and placed_on != mesh:
        params = sharding_rules.shard_params(params, cfg, mesh)
    rows, prompts, inputs = batch.rows, batch.prompts, batch.inputs
    if mesh is not None:  # global arrays, so every process feeds the same program
        inputs = sharding_rules.replicate(inputs, mesh)
    timings: dict[str, float] = {"compile": 0.0}
    options = dict(timings=timings, mesh=mesh, eager=eager)
    if speculative_method == "draft" and mesh is not None:
        raise ValueError("speculative_method='draft' runs on one device; under a mesh use "
                         "'ngram' or none")
    state, cache, first_logits = _timed(_prefill_jit, (params, *inputs),
                                        batch.prefill_static(cfg, speculative_method),
                                        f"prefill ({batch.shape})", "prefill", options)
    if speculative_method == "none":
        state, out_tokens, _, logits = _timed(
            _decode_jit, (params, cache, state, first_logits),
            batch.decode_static(cfg, keep_logits=return_logits), f"decode ({batch.shape})",
            "decode", options)
        steps, drafted, accepted = None, np.zeros(batch.size, int), np.zeros(batch.size, int)
    else:
        k = num_speculative_tokens
        state, out_tokens, _, logits, steps, drafted, accepted = _timed(
            _speculative_decode_jit, (params, cache, state, first_logits, inputs[0]),
            batch.decode_static(cfg, k, speculative_method, keep_logits=return_logits),
            f"speculative decode ({batch.shape}, {k} drafts)", "decode", options)
        drafted, accepted = (sharding_rules.to_host(x) for x in (drafted, accepted))

    out_tokens, lengths, stopped = (
        sharding_rules.to_host(x) for x in (out_tokens, state.count, state.stopped))
    logits = None if logits is None else sharding_rules.to_host(logits)
    # Without speculation every step adds one token to each unfinished row.
    steps = int(max(lengths[:rows])) if steps is None else int(sharding_rules.to_host(steps))
    return GenerateResult(
        tokens=[out_tokens[i, : lengths[i]].tolist() for i in range(rows)],
        lengths=lengths[:rows].tolist(),
        prompt_lengths=[len(p) for p in prompts],
        finish_reasons=["stop" if s else "length" for s in stopped[:rows]],
        timings=timings,
        decode_steps=steps - 1,
        draft_tokens=drafted[:rows].tolist(),
        accepted_tokens=accepted[:rows].tolist(),
        logits=None if logits is None else [logits[i, : lengths[i]] for i in range(rows)],
    )


def precompile(
    params,
    tokens: Sequence[Sequence[int]],
    cfg: ModelConfig,
    *,
    max_new_tokens: int = 256,
    sampling: SamplingParams | Sequence[SamplingParams] | None = None,
    stop_token_ids: Sequence[int] = (),
    speculative_method: str = "none",
    num_speculative_tokens: int = 4,
    prefill_chunk: int = PREFILL_CHUNK,
    progress: bool = False,
) -> float:
    """Compiles (or reads from the persistent cache) the programs `generate` runs for these
    arguments, running nothing, and returns the seconds it took. `params` may be
    `api.weight_shapes(cfg)`: the programs need only the weights' shapes, so this can run
    while they load. One device (under a mesh the programs follow the params' placement)."""
    speculative.check_options(speculative_method, num_speculative_tokens, params)
    _check_chunk(prefill_chunk)
    batch = _Batch.of(tokens, cfg, max_new_tokens, sampling, stop_token_ids, data=1,
                      chunk=prefill_chunk)
    timings = {"compile": 0.0}
    options = dict(timings=timings, progress=progress)
    prefill = runtime.compiled(_prefill_jit, (params, *batch.inputs),
                               batch.prefill_static(cfg, speculative_method),
                               f"prefill ({batch.shape})", **options)
    # The prefill's outputs in shape alone (their sharding and layout as any argument's).
    state, cache, first_logits = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                                              prefill.out_info)
    if speculative_method == "none":
        runtime.compiled(_decode_jit, (params, cache, state, first_logits),
                         batch.decode_static(cfg), f"decode ({batch.shape})", **options)
    else:
        k = num_speculative_tokens
        runtime.compiled(_speculative_decode_jit,
                         (params, cache, state, first_logits, batch.inputs[0]),
                         batch.decode_static(cfg, k, speculative_method),
                         f"speculative decode ({batch.shape}, {k} drafts)", **options)
    return timings["compile"]


@dataclasses.dataclass
class _Batch:
    """generate()'s prompts and options as its programs take them: padded to the buckets."""

    prompts: list[list[int]]
    size: int  # rows, padded to a power of two (and to a multiple of the mesh's data axis)
    seq: int  # prompt length bucket
    out_len: int  # new tokens bucket
    cache_len: int
    chunk: int  # the most prompt positions one step of the prefill runs
    # tokens [size, seq], prompt lengths [size], SamplingArrays [size], stop ids [size, stops],
    # max_new_tokens
    inputs: tuple

    @property
    def rows(self) -> int:
        return len(self.prompts)

    @property
    def shape(self) -> str:
        chunks = f" in chunks of {self.chunk}" if self.seq > self.chunk else ""
        return f"batch {self.size}, prompt {self.seq}{chunks}, cache {self.cache_len}"

    def prefill_static(self, cfg: ModelConfig, method: str = "none") -> dict:
        return {"cfg": cfg, "cache_len": self.cache_len, "features": method == "draft",
                "chunk": self.chunk if self.seq > self.chunk else None}

    def decode_static(self, cfg: ModelConfig, k: int | None = None, method: str = "none",
                      keep_logits: bool = False) -> dict:
        return {"cfg": cfg, "out_len": self.out_len, "keep_logits": keep_logits} | (
            {} if k is None else {"k": k, "method": method})

    @staticmethod
    def of(tokens, cfg: ModelConfig, max_new_tokens: int, sampling, stop_token_ids,
           data: int, chunk: int = 0) -> _Batch:
        prompts = _check_prompts(tokens, cfg, max_new_tokens)
        rows = len(prompts)
        if sampling is None or isinstance(sampling, SamplingParams):
            sampling = [sampling or SamplingParams()] * rows
        if len(sampling) != rows:
            raise ValueError(f"got {len(sampling)} SamplingParams for {rows} prompts; pass one, "
                             "or one per prompt")
        size = -(-bucket(rows) // data) * data  # rows split evenly over the data axis
        seq = bucket(max(map(len, prompts)), MIN_SEQ_BUCKET, cfg.max_seq_len)
        out_len = bucket(max_new_tokens, MIN_SEQ_BUCKET)
        token_array = np.zeros((size, seq), np.int32)
        prompt_lens = np.zeros(size, np.int32)
        for i, prompt in enumerate(prompts):
            token_array[i, : len(prompt)] = prompt
            prompt_lens[i] = len(prompt)
        sampling_arrays = SamplingArrays.stack(list(sampling) + [SamplingParams()] * (size - rows))
        # A fixed-size stop list keeps the compiled program independent of how many are given.
        stop_ids = np.full((size, bucket(len(stop_token_ids), 8)), NO_TOKEN, np.int32)
        for i, row in enumerate(sampling):
            if not row.ignore_eos:
                stop_ids[i, : len(stop_token_ids)] = list(stop_token_ids)
        inputs = (token_array, prompt_lens, sampling_arrays, stop_ids, np.int32(max_new_tokens))
        return _Batch(prompts, size, seq, out_len, min(seq + out_len, cfg.max_seq_len),
                      chunk or seq, inputs)


def _timed(jitted, args, static, what: str, name: str, options: dict):
    """runtime.run, with the seconds besides compiling recorded as timings[name]."""
    timings = options["timings"]
    compile_before = timings["compile"]
    start = time.perf_counter()
    out = jax.block_until_ready(runtime.run(jitted, args, static, what, **options))
    timings[name] = time.perf_counter() - start - (timings["compile"] - compile_before)
    return out


def _check_chunk(chunk) -> None:
    if isinstance(chunk, bool) or not isinstance(chunk, int | np.integer) or chunk < 1:
        raise ValueError(f"prefill_chunk={chunk!r}; it must be a positive integer (tokens "
                         "per prefill step)")


def _check_prompts(tokens, cfg: ModelConfig, max_new_tokens: int) -> list[list[int]]:
    """Validates the prompts and lengths; errors say what was wrong, with the numbers."""
    if isinstance(tokens, np.ndarray | jax.Array):
        tokens = np.asarray(tokens).reshape(-1, np.shape(tokens)[-1]).tolist()
    prompts = [list(map(int, p)) for p in tokens]
    if not prompts:
        raise ValueError("no prompts given: pass a list of token id lists")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int | np.integer):
        raise ValueError(f"max_new_tokens must be an integer, got {max_new_tokens!r}")
    if max_new_tokens <= 0:
        raise ValueError(f"max_new_tokens={max_new_tokens}; it must be at least 1")
    for i, prompt in enumerate(prompts):
        if not prompt:
            raise ValueError(f"prompt {i} is empty; a prompt needs at least one token")
        if len(prompt) > cfg.max_seq_len:
            raise ValueError(f"prompt {i} has {len(prompt):,} tokens; this model's context is "
                             f"{cfg.max_seq_len:,}")
        if len(prompt) + max_new_tokens > cfg.max_seq_len:
            raise ValueError(
                f"prompt {i} has {len(prompt):,} tokens and max_new_tokens={max_new_tokens:,}: "
                f"together more than this model's context of {cfg.max_seq_len:,} "
                f"(at most {cfg.max_seq_len - len(prompt):,} new tokens fit)")
        bad = [t for t in prompt if not 0 <= t < cfg.vocab_size]
        if bad:
            raise ValueError(f"prompt {i} has token ids outside [0, {cfg.vocab_size}): {bad[:5]}")
    return prompts


