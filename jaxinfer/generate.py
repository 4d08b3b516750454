"""generate(): one jitted prefill, then every new token in one jitted `lax.while_loop`.

Batch size, prompt length and the number of new tokens are padded to power-of-two
buckets; each compiled program is keyed by its bucket, so calls within a bucket reuse it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxinfer.cache import KVCache
from jaxinfer.config import ModelConfig
from jaxinfer.models import family
from jaxinfer.sampling import SamplingArrays, SamplingParams, sample
from jaxinfer.sharding import rules as sharding_rules

log = logging.getLogger(__name__)
MIN_SEQ_BUCKET = 16
NO_TOKEN = -1  # fills the output after a row has finished


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class DecodeState:
    """What the decode loop carries besides the cache; every field is [batch] unless noted."""

    tokens: jax.Array  # [batch, max_new] generated so far, NO_TOKEN after a row finished
    last: jax.Array  # the newest token, fed to the next step
    positions: jax.Array  # where `last` sits in the sequence
    lengths: jax.Array  # tokens generated
    done: jax.Array
    stopped: jax.Array  # finished on a stop token (else on length)
    step: jax.Array  # scalar: loop iterations so far

    def record(self, token: jax.Array, stop_ids: jax.Array, max_new: jax.Array) -> DecodeState:
        """Appends `token` to every unfinished row and updates which rows are done."""
        live = ~self.done
        token = jnp.where(live, token, NO_TOKEN)
        hit_stop = live & jnp.any(token[:, None] == stop_ids[None, :], axis=-1)
        lengths = self.lengths + live
        return DecodeState(
            tokens=jax.lax.dynamic_update_index_in_dim(self.tokens, token, self.step, axis=1),
            last=jnp.where(live, token, self.last),
            positions=self.positions + (live & (self.step > 0)),
            lengths=lengths,
            done=self.done | hit_stop | (lengths >= max_new),
            stopped=self.stopped | hit_stop,
            step=self.step + 1,
        )


@dataclasses.dataclass
class GenerateResult:
    """Per row: generated ids (a stop token that ended the row included), count, why it ended."""

    tokens: list[list[int]]
    lengths: list[int]
    prompt_lengths: list[int]
    finish_reasons: list[str]  # "stop" (a stop token) or "length" (max_new_tokens)
    timings: dict[str, float]  # seconds: compile (0 when cached), prefill, decode


def bucket(n: int, minimum: int = 1, cap: int | None = None) -> int:
    """The smallest power of two >= max(n, minimum), capped at `cap`."""
    size = max(minimum, 1 << (max(n, 1) - 1).bit_length())
    return min(size, cap) if cap else size


def _prefill(params, tokens, prompt_lens, sampling, stop_ids, max_new, *, cfg, cache_len, out_len):
    """Runs the prompts [batch, seq] through the model and samples each row's first token."""
    model = family(cfg.architecture)
    batch, seq = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(seq, dtype=jnp.int32), (batch, seq))
    cache = sharding_rules.constrain_cache(KVCache.init(cfg, batch, cache_len), cfg)
    hidden, cache = model.transformer(params, tokens, positions, cache, cfg)
    last_hidden = hidden[jnp.arange(batch), prompt_lens - 1]
    logits = model.unembed(params, last_hidden, cfg)
    state = DecodeState(
        tokens=jnp.full((batch, out_len), NO_TOKEN, jnp.int32),
        last=jnp.zeros(batch, jnp.int32),
        positions=prompt_lens,
        lengths=jnp.zeros(batch, jnp.int32),
        done=prompt_lens == 0,  # padding rows of the batch bucket
        stopped=jnp.zeros(batch, bool),
        step=jnp.int32(0),
    )
    return state.record(sample(logits, sampling, state.step), stop_ids, max_new), cache


def _decode(params, cache, state, sampling, stop_ids, max_new, *, cfg):
    """Feeds each row's last token until every row is done or max_new tokens exist."""
    model = family(cfg.architecture)

    def cond(carry):
        _, state = carry
        return (state.step < max_new) & ~jnp.all(state.done)

    def step(carry):
        cache, state = carry
        logits, cache = model.forward(
            params, state.last[:, None], state.positions[:, None], cache, cfg
        )
        return cache, state.record(sample(logits[:, 0], sampling, state.step), stop_ids, max_new)

    cache, state = jax.lax.while_loop(cond, step, (cache, state))
    return state, cache


_prefill_jit = jax.jit(_prefill, static_argnames=("cfg", "cache_len", "out_len"))
_decode_jit = jax.jit(_decode, static_argnames=("cfg",), donate_argnames=("cache",))
_executables: dict = {}  # (function, static args, argument shapes) -> compiled program


def compiled_programs() -> int:
    """How many programs generate() has compiled in this process (one per bucket and step)."""
    return len(_executables)


def _run(jitted, args: tuple, static: dict, timings: dict, what: str):
    """Calls `jitted`, compiling ahead of time (and timing it) only for a new bucket."""
    leaves, treedef = jax.tree.flatten(args)
    shapes = tuple((np.shape(x), np.result_type(x).name, getattr(x, "sharding", None))
                   for x in leaves)  # a program is compiled for its inputs' shardings too
    key = (jitted, tuple(sorted(static.items())), treedef, shapes)
    if key not in _executables:
        enable_compilation_cache()
        log.info("compiling %s ...", what)
        start = time.perf_counter()
        _executables[key] = jitted.lower(*args, **static).compile()
        seconds = time.perf_counter() - start
        log.info("compiled %s in %.1fs", what, seconds)
        timings["compile"] = timings.get("compile", 0.0) + seconds
    return _executables[key](*args)


def generate(
    params,
    tokens: Sequence[Sequence[int]],
    cfg: ModelConfig,
    *,
    max_new_tokens: int = 256,
    sampling: SamplingParams | Sequence[SamplingParams] | None = None,
    stop_token_ids: Sequence[int] = (),
    mesh: jax.sharding.Mesh | None = None,
) -> GenerateResult:
    """Generates up to `max_new_tokens` tokens after each prompt in `tokens` (a list of id lists).

    A row ends at the first token in `stop_token_ids` (pass the tokenizer's `stop_ids`) or
    after `max_new_tokens` tokens. `sampling` is one SamplingParams for every row or one per
    row; the default is greedy.

    `mesh`: run sharded over this mesh (default: the mesh `params` are placed on, e.g. by
    `load_model(mesh=...)`); params are moved onto their shardings if they are not there.
    Results are gathered to every process.
    """
    prompts = _check_prompts(tokens, cfg, max_new_tokens)
    rows = len(prompts)
    if sampling is None or isinstance(sampling, SamplingParams):
        sampling = [sampling or SamplingParams()] * rows
    if len(sampling) != rows:
        raise ValueError(
            f"got {len(sampling)} SamplingParams for {rows} prompts; pass one, or one per prompt"
        )

    placed_on = sharding_rules.mesh_of(params)
    mesh = mesh or placed_on
    if mesh is not None and placed_on != mesh:
        params = sharding_rules.shard_params(params, cfg, mesh)
    data = mesh.shape["data"] if mesh is not None else 1
    batch = -(-bucket(rows) // data) * data  # rows split evenly over the data axis
    seq = bucket(max(map(len, prompts)), MIN_SEQ_BUCKET, cfg.max_seq_len)
    out_len = bucket(max_new_tokens, MIN_SEQ_BUCKET)
    cache_len = min(seq + out_len, cfg.max_seq_len)
    token_array = np.zeros((batch, seq), np.int32)
    prompt_lens = np.zeros(batch, np.int32)
    for i, prompt in enumerate(prompts):
        token_array[i, : len(prompt)] = prompt
        prompt_lens[i] = len(prompt)
    sampling_arrays = SamplingArrays.stack(list(sampling) + [SamplingParams()] * (batch - rows))
    # A fixed-size stop list keeps the compiled program independent of how many are given.
    stop_ids = np.full(bucket(len(stop_token_ids), 8), NO_TOKEN, np.int32)
    stop_ids[: len(stop_token_ids)] = list(stop_token_ids)
    max_new = np.int32(max_new_tokens)

    timings: dict[str, float] = {"compile": 0.0}
    inputs = (token_array, prompt_lens, sampling_arrays, stop_ids, max_new)
    if mesh is not None:  # global arrays, so every process feeds the same program
        inputs = sharding_rules.replicate(inputs, mesh)
    static = {"cfg": cfg, "cache_len": cache_len, "out_len": out_len}
    shape = f"batch {batch}, prompt {seq}, cache {cache_len}"
    with jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext():
        state, cache = _timed_call(_prefill_jit, (params, *inputs), static, timings, "prefill",
                                   shape)
        args = (params, cache, state, *inputs[2:])
        state, _ = _timed_call(_decode_jit, args, {"cfg": cfg}, timings, "decode", shape)

    out_tokens, lengths, stopped = (
        sharding_rules.to_host(x) for x in (state.tokens, state.lengths, state.stopped))
    return GenerateResult(
        tokens=[out_tokens[i, : lengths[i]].tolist() for i in range(rows)],
        lengths=lengths[:rows].tolist(),
        prompt_lengths=[len(p) for p in prompts],
        finish_reasons=["stop" if s else "length" for s in stopped[:rows]],
        timings=timings,
    )


def _timed_call(jitted, args, static, timings, name, shape):
    compile_before = timings["compile"]
    start = time.perf_counter()
    out = jax.block_until_ready(_run(jitted, args, static, timings, f"{name} ({shape})"))
    timings[name] = time.perf_counter() - start - (timings["compile"] - compile_before)
    return out


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


_cache_dir: str | None = None


def enable_compilation_cache(path: str | os.PathLike | None = None) -> None:
    """Turns on XLA's persistent compilation cache (default: ~/.cache/jaxinfer/xla).

    Leaves a cache directory the user already configured for jax alone. jax reads the
    directory once per process, so a different path after the first compile only warns.
    """
    global _cache_dir
    if path is None and (_cache_dir or jax.config.jax_compilation_cache_dir):
        return
    if path is None:
        base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
        path = Path(base) / "jaxinfer" / "xla"
    if _cache_dir is not None:
        if str(path) != _cache_dir:
            log.warning("compilation cache already at %s for this process; ignoring %s",
                        _cache_dir, path)
        return
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.1)
    _cache_dir = str(path)
