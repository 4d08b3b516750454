"""The serving engine: continuous batching over fixed decode slots and a paged KV cache.

The API follows JetStream's engine_api; each call says what it does to the decode state:

- `prefill(rows)`: runs up to `prefill_batch_size` prompts through the model in one call
  (padded to that many rows and to the prompt-length bucket), writes their keys and values
  into the pages each row brings, and returns each row's first sampled token.
- `insert(slot, ...)`: puts a prefilled request into a free decode slot: its pages become
  the slot's page-table row; its last token, position, token budget, sampling parameters and
  stop ids become the slot's row of the decode state.
- `generate()`: runs `decode_steps` steps for ALL slots in one device call and returns the
  tokens [slots, steps] (NO_TOKEN where a slot was free or had finished).
- `free(slot)`: empties a slot and returns its pages to the pool.

The page pool lives on the device (`PagedKVCache`); which page belongs to whom is host data
here (`allocate`, `grow`, `release`). Page 0 is scratch: never handed out, so padding rows and
free slots write there. Shapes never depend on what is queued (all slots decode every step,
prefill is padded to fixed rows), which makes greedy output batch invariant by construction,
and every program is compiled by `warmup()`, so serving compiles nothing new.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxinfer.api import Model
from jaxinfer.cache import PagedKVCache
from jaxinfer.config import ModelConfig
from jaxinfer.generate import bucket, enable_compilation_cache
from jaxinfer.models import family
from jaxinfer.sampling import SamplingArrays, SamplingParams, sample
from jaxinfer.serving.config import EngineConfig
from jaxinfer.sharding.rules import cache_specs, constrain_cache, model_rules

log = logging.getLogger(__name__)
NO_TOKEN = -1


def _sample(logits: jax.Array, sampling: SamplingArrays, counts: jax.Array) -> jax.Array:
    """Samples row b from a seed derived from (its seed, tokens it has generated so far), so a
    seeded request draws the same tokens whichever slot or batch it runs in."""
    keys = jax.vmap(lambda s, c: jax.random.fold_in(jax.random.key(s), c))(sampling.seed, counts)
    seeds = jax.vmap(lambda k: jax.random.bits(k, dtype=jnp.uint32))(keys)
    return sample(logits, dataclasses.replace(sampling, seed=seeds), jnp.int32(0))


def _prefill(params, cache, tokens, lengths, page_rows, sampling, counts, *, cfg: ModelConfig):
    """tokens [rows, seq] (row r's prompt in its first lengths[r] slots) -> first tokens [rows].

    Keys and values land in the pages of `page_rows` [rows, pages_per_seq]; padding past a
    prompt lands past its last position, where masking by position hides it until decode
    overwrites it (or on page 0, the scratch page).
    """
    model = family(cfg.architecture)
    rows, seq = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(seq, dtype=jnp.int32), (rows, seq))
    table = cache.page_table
    hidden, cache = model.transformer(
        params, tokens, positions, dataclasses.replace(cache, page_table=page_rows), cfg
    )
    last_hidden = hidden[jnp.arange(rows), jnp.maximum(lengths - 1, 0)]
    logits = model.unembed(params, last_hidden, cfg)
    cache = constrain_cache(dataclasses.replace(cache, page_table=table), cfg)
    return _sample(logits, sampling, counts), cache


def _decode(params, cache, page_table, last, position, count, done, max_tokens, stop_ids,
            sampling, *, cfg: ModelConfig, steps: int):
    """`steps` decode steps for every slot: each feeds its `last` token at `position`.

    Per slot [slots]: count = tokens generated, done = finished (stop id or max_tokens), which
    freezes it. Returns tokens [slots, steps] (NO_TOKEN once done), the new state, the cache.
    """
    model = family(cfg.architecture)
    cache = dataclasses.replace(cache, page_table=page_table)

    def step(carry, _):
        cache, last, position, count, done = carry
        logits, cache = model.forward(params, last[:, None], position[:, None], cache, cfg)
        live = ~done
        token = jnp.where(live, _sample(logits[:, 0], sampling, count), NO_TOKEN)
        count = count + live
        hit_stop = live & jnp.any(token[:, None] == stop_ids, axis=-1)
        done = done | hit_stop | (count >= max_tokens)
        return (cache, jnp.where(live, token, last), position + live, count, done), token

    carry = (cache, last, position, count, done)
    (cache, last, position, count, done), tokens = jax.lax.scan(step, carry, None, length=steps)
    return tokens.T, last, position, count, done, constrain_cache(cache, cfg)


_prefill_jit = jax.jit(_prefill, static_argnames=("cfg",), donate_argnames=("cache",))
_decode_jit = jax.jit(_decode, static_argnames=("cfg", "steps"), donate_argnames=("cache",))
_executables: dict = {}  # (program, static args, argument shapes) -> compiled executable


def compiled_programs() -> int:
    """How many serving programs this process has compiled (prefill buckets + decode)."""
    return len(_executables)


def _run(jitted, args: tuple, static: dict, what: str, mesh=None, progress: bool = False):
    """Calls `jitted` through an ahead-of-time executable, compiling a new shape once."""
    leaves, treedef = jax.tree.flatten(args)
    shapes = tuple((np.shape(x), np.result_type(x).name) for x in leaves)
    key = (jitted, tuple(sorted(static.items())), treedef, shapes, mesh)
    with jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext():
        if key not in _executables:
            enable_compilation_cache()
            start = time.perf_counter()
            _executables[key] = jitted.lower(*args, **static).compile()
            message = f"compiled {what} in {time.perf_counter() - start:.1f}s"
            print(message, flush=True) if progress else log.info(message)
        return _executables[key](*args)


@dataclasses.dataclass
class PrefillRow:
    """One prompt to prefill: its tokens, the pages that will hold them, how to sample."""

    tokens: Sequence[int]
    pages: Sequence[int]
    sampling: SamplingParams
    count: int = 0  # tokens this request generated before (a resumed, preempted request)


class Engine:
    """Fixed decode slots over a paged KV cache; see the module docstring for the API."""

    def __init__(self, model: Model, config: EngineConfig | None = None, mesh=None):
        """`mesh`: a jax Mesh the params are already sharded over (jaxinfer.sharding); the KV
        cache is then replicated on it, else it lives on the default device."""
        config = config or EngineConfig()
        self.model_config = cfg = model.config
        self.params = model.params
        self.tokenizer = model.tokenizer
        self.config = config
        self.slots = config.max_batch_size
        self.steps = config.decode_steps
        self.context = config.context(cfg)
        self.page_size = config.page_size
        self.pages_per_seq = config.pages_per_seq(cfg)
        self.num_pages = config.pool_pages(cfg)
        self.buckets = prefill_buckets(config.min_prefill_bucket, self.context)
        self.cache = PagedKVCache.init(
            cfg, self.num_pages, self.page_size, self.slots, self.pages_per_seq
        )
        self.mesh = mesh
        if mesh is not None:  # the pool is split like the model: over kv_heads or head_dim
            specs = cache_specs(self.cache, model_rules(cfg, mesh))
            self.cache = jax.device_put(self.cache, jax.tree.map(
                lambda spec: jax.sharding.NamedSharding(mesh, spec), specs,
                is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec)))
        self._free_pages = list(range(self.num_pages - 1, 0, -1))  # pop() hands out low ids first
        slots = self.slots
        self.page_table = np.zeros((slots, self.pages_per_seq), np.int32)
        self.slot_pages: list[list[int]] = [[] for _ in range(slots)]
        self.last = np.zeros(slots, np.int32)
        self.position = np.zeros(slots, np.int32)
        self.count = np.zeros(slots, np.int32)
        self.done = np.ones(slots, bool)  # free slots count as done: they never emit
        self.max_tokens = np.zeros(slots, np.int32)
        self.stop_ids = np.full((slots, config.max_stop_token_ids), NO_TOKEN, np.int32)
        self.sampling = SamplingArrays.stack([SamplingParams()] * slots)

    # -- pages --------------------------------------------------------------------------------

    @property
    def free_page_count(self) -> int:
        return len(self._free_pages)

    @property
    def usable_pages(self) -> int:
        return self.num_pages - 1

    def pages_for(self, tokens: int) -> int:
        """Pages that hold `tokens` positions."""
        return math.ceil(tokens / self.page_size)

    def allocate(self, n: int) -> list[int] | None:
        """n free pages, or None (and nothing taken) when fewer are left."""
        if n > len(self._free_pages):
            return None
        return [self._free_pages.pop() for _ in range(n)]

    def release(self, pages: Sequence[int]) -> None:
        self._free_pages.extend(reversed(pages))

    def grow(self, slot: int, positions: int) -> bool:
        """Gives `slot` pages for its first `positions` positions; False if the pool ran out."""
        have = self.slot_pages[slot]
        need = min(self.pages_for(positions), self.pages_per_seq) - len(have)
        if need <= 0:
            return True
        pages = self.allocate(need)
        if pages is None:
            return False
        self.page_table[slot, len(have) : len(have) + need] = pages
        have.extend(pages)
        return True

    # -- the four engine calls ----------------------------------------------------------------

    def prefill(self, rows: Sequence[PrefillRow]) -> list[int]:
        """Runs the prompts (at most prefill_batch_size) and returns each one's first token."""
        width = self.config.prefill_batch_size
        if not 0 < len(rows) <= width:
            raise ValueError(f"prefill takes 1 to {width} prompts; got {len(rows)}")
        longest = max(len(r.tokens) for r in rows)
        if longest > self.context:
            raise ValueError(f"prompt has {longest} tokens; this server's context is "
                             f"{self.context}")
        seq = self.bucket(longest)
        tokens = np.zeros((width, seq), np.int32)
        lengths = np.ones(width, np.int32)
        page_rows = np.zeros((width, self.pages_per_seq), np.int32)
        counts = np.zeros(width, np.int32)
        for i, row in enumerate(rows):
            tokens[i, : len(row.tokens)] = row.tokens
            lengths[i] = len(row.tokens)
            page_rows[i, : len(row.pages)] = row.pages
            counts[i] = row.count
        sampling = [r.sampling for r in rows] + [SamplingParams()] * (width - len(rows))
        args = (self.params, self.cache, tokens, lengths, page_rows,
                SamplingArrays.stack(sampling), counts)
        first, self.cache = _run(_prefill_jit, args, {"cfg": self.model_config},
                                 f"prefill ({width} x {seq})", self.mesh)
        return np.asarray(first)[: len(rows)].tolist()

    def insert(
        self,
        slot: int,
        *,
        last_token: int,
        position: int,
        count: int,
        max_tokens: int,
        pages: Sequence[int],
        sampling: SamplingParams,
        stop_ids: Sequence[int],
    ) -> None:
        """Makes `slot` decode from `last_token` at `position`, having generated `count` of
        `max_tokens` tokens, with its keys and values in `pages`."""
        if self.slot_pages[slot]:
            raise ValueError(f"slot {slot} is in use; free it first")
        if len(stop_ids) > self.stop_ids.shape[1]:
            raise ValueError(f"{len(stop_ids)} stop ids; at most {self.stop_ids.shape[1]}")
        self.slot_pages[slot] = list(pages)
        self.page_table[slot] = 0
        self.page_table[slot, : len(pages)] = pages
        self.last[slot] = last_token
        self.position[slot] = position
        self.count[slot] = count
        self.max_tokens[slot] = max_tokens
        self.done[slot] = False
        self.stop_ids[slot] = NO_TOKEN
        self.stop_ids[slot, : len(stop_ids)] = list(stop_ids)
        for field in dataclasses.fields(SamplingArrays):
            getattr(self.sampling, field.name)[slot] = getattr(sampling, field.name)

    def generate(self) -> np.ndarray:
        """decode_steps steps for every slot -> tokens [slots, steps], NO_TOKEN where idle."""
        width = self.decode_width()
        rows = slice(0, width)
        sampling = jax.tree.map(lambda column: column[rows], self.sampling)
        args = (self.params, self.cache, self.page_table[rows], self.last[rows],
                self.position[rows], self.count[rows], self.done[rows], self.max_tokens[rows],
                self.stop_ids[rows], sampling)
        out = self._decode(args, width)
        tokens, last, position, count, done, self.cache = out
        tokens, last, position, count, done = jax.device_get((tokens, last, position, count, done))
        self.last[rows], self.position[rows], self.count[rows] = last, position, count
        self.done[rows] = done
        all_tokens = np.full((self.slots, self.steps), NO_TOKEN, np.int32)
        all_tokens[rows] = tokens
        return all_tokens

    def decode_width(self) -> int:
        """How many slots (from slot 0) the next decode call runs: all of them, or with
        adaptive_decode the smallest width in `decode_widths` covering every occupied slot."""
        if not self.config.adaptive_decode:
            return self.slots
        occupied = [s for s in range(self.slots) if self.slot_pages[s]]
        last = max(occupied, default=0) + 1
        return next(w for w in self.decode_widths if w >= last)

    @property
    def decode_widths(self) -> list[int]:
        if not self.config.adaptive_decode:
            return [self.slots]
        widths = [w for w in (1 << i for i in range(self.slots.bit_length())) if w < self.slots]
        return [*widths, self.slots]

    def _decode(self, args: tuple, width: int, progress: bool = False):
        static = {"cfg": self.model_config, "steps": self.steps}
        return _run(_decode_jit, args, static, f"decode ({width} slots x {self.steps} steps)",
                    self.mesh, progress)

    def free(self, slot: int) -> None:
        """Empties `slot`: it stops emitting and its pages go back to the pool."""
        self.release(self.slot_pages[slot])
        self.slot_pages[slot] = []
        self.page_table[slot] = 0
        self.done[slot] = True
        self.last[slot] = self.position[slot] = self.count[slot] = 0

    # -- compilation --------------------------------------------------------------------------

    def bucket(self, length: int) -> int:
        """The prompt-length bucket a prompt of `length` tokens is padded to."""
        return bucket(length, self.config.min_prefill_bucket, self.context)

    def warmup(self, progress: bool = False) -> None:
        """Compiles decode and every prefill bucket now, so serving never compiles."""
        width = self.config.prefill_batch_size
        sampling = SamplingArrays.stack([SamplingParams()] * width)
        for seq in self.buckets:
            args = (self.params, self.cache, np.zeros((width, seq), np.int32),
                    np.ones(width, np.int32), np.zeros((width, self.pages_per_seq), np.int32),
                    sampling, np.zeros(width, np.int32))
            _, self.cache = _run(_prefill_jit, args, {"cfg": self.model_config},
                                 f"prefill ({width} x {seq})", self.mesh, progress)
        # All slots are free (done), so these decode calls write only to the scratch page.
        for width in self.decode_widths:
            rows = slice(0, width)
            sampling = jax.tree.map(lambda column, rows=rows: column[rows], self.sampling)
            args = (self.params, self.cache, self.page_table[rows], self.last[rows],
                    self.position[rows], self.count[rows], self.done[rows],
                    self.max_tokens[rows], self.stop_ids[rows], sampling)
            self.cache = self._decode(args, width, progress)[-1]
        jax.block_until_ready(self.cache)

    @property
    def num_programs(self) -> int:
        """Programs `warmup` compiles: one per prefill bucket and one per decode width."""
        return len(self.buckets) + len(self.decode_widths)


def prefill_buckets(minimum: int, context: int) -> list[int]:
    """Prompt-length buckets: powers of two from `minimum`, the last one capped at `context`."""
    sizes, size = [], bucket(1, minimum, context)
    while True:
        sizes.append(size)
        if size >= context:
            return sizes
        size = min(size * 2, context)
