"""EngineConfig: the serving engine's slots, page pool and dynamic-batching limits."""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from jaxinfer import speculative
from jaxinfer.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    """How the server batches: every field is fixed for the life of a server.

    Decode runs `decode_steps` steps per device call over the smallest power-of-two width of
    slots that holds every running request (see serving.engine for why a request's logits do
    not depend on that width); prefill runs `prefill_batch_size` prompts of one length bucket
    at a time.
    """

    max_batch_size: int = 8  # decode slots: requests generating at once
    max_seq_len: int = 1024  # per request, prompt + generated (capped at the model's context)
    page_size: int = 16  # tokens per KV page
    kv_cache_gb: float = 1.0  # page pool size, when num_pages is not given
    num_pages: int | None = None  # page pool size (page 0 is scratch), overrides kv_cache_gb
    decode_steps: int = 4  # decode steps per device call (K)
    prefill_batch_size: int = 1  # prompts per prefill call, always padded to this many
    min_prefill_bucket: int = 16  # shortest prompt bucket; buckets double up to the chunk
    max_queue_size: int = 256  # waiting requests; beyond it new ones get HTTP 429
    max_queue_delay_ms: float = 0.0  # how long to hold a partial prefill batch for more prompts
    max_stop_token_ids: int = 16  # per request, tokenizer stops included (a fixed-size array)
    eager: bool = False  # run the same code without jit (jax.disable_jit), for debugging
    enable_prefix_caching: bool = True  # reuse the KV pages of cached prompt prefixes
    # Host memory for cached pages evicted from the device pool (0: none; a no-op on CPU-only
    # machines, where the pool is in host memory already).
    host_kv_cache_gb: float = 0.0
    # Prompt tokens per prefill call, the largest prefill bucket: a longer prompt is prefilled
    # in chunks of this many, with the running requests decoding between chunks.
    max_num_batched_tokens: int = 512
    # Speculative decoding (jaxinfer.speculative): each decode step drafts up to
    # num_speculative_tokens tokens per slot (by n-gram lookup, or with the draft heads the
    # model was loaded with: load_model(draft=...)) and verifies them in one call.
    speculative_method: str = "none"
    num_speculative_tokens: int = 4

    def __post_init__(self):
        positive = ("max_batch_size", "max_seq_len", "page_size", "decode_steps",
                    "prefill_batch_size", "min_prefill_bucket", "max_queue_size",
                    "max_stop_token_ids", "max_num_batched_tokens")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r}; it must be an integer >= 1")
        speculative.check_options(self.speculative_method, self.num_speculative_tokens)
        if self.max_queue_delay_ms < 0:
            raise ValueError(f"max_queue_delay_ms={self.max_queue_delay_ms}; it must be >= 0")
        if self.host_kv_cache_gb < 0:
            raise ValueError(f"host_kv_cache_gb={self.host_kv_cache_gb}; it must be >= 0")
        if self.num_pages is None and self.kv_cache_gb <= 0:
            raise ValueError(f"kv_cache_gb={self.kv_cache_gb}; it must be > 0")
        if self.num_pages is not None and self.num_pages < 2:
            raise ValueError(f"num_pages={self.num_pages}; it must be >= 2 (page 0 is scratch)")

    @property
    def draft_tokens(self) -> int:
        """Tokens drafted per slot and step: num_speculative_tokens, or 0 without speculation."""
        return 0 if self.speculative_method == "none" else self.num_speculative_tokens

    def context(self, cfg: ModelConfig) -> int:
        """The longest request (prompt + generated tokens) this server accepts."""
        return min(self.max_seq_len, cfg.max_seq_len)

    def prefill_chunk(self, cfg: ModelConfig) -> int:
        """The most prompt tokens one prefill call takes (one row's chunk)."""
        return min(self.max_num_batched_tokens, self.context(cfg))

    def pages_per_seq(self, cfg: ModelConfig) -> int:
        return math.ceil(self.context(cfg) / self.page_size)

    def page_bytes(self, cfg: ModelConfig) -> int:
        """Bytes of one page: keys and values of every layer."""
        itemsize = np.dtype(cfg.dtype).itemsize
        return 2 * cfg.n_layers * cfg.n_kv_heads * self.page_size * cfg.head_dim * itemsize

    def pool_pages(self, cfg: ModelConfig) -> int:
        """Pages in the pool, scratch page included: `num_pages`, or as many as fit the budget
        but no more than every slot can hold at once (each decode step reads past the pages in
        use, see benchmarks/README.md)."""
        if self.num_pages is not None:
            pages = self.num_pages
        else:
            pages = min(int(self.kv_cache_gb * 2**30 // self.page_bytes(cfg)),
                        self.max_batch_size * self.pages_per_seq(cfg) + 1)
        # At least one full-length request must fit, or nothing could ever be served.
        needed = self.pages_per_seq(cfg) + 1
        if pages < needed:
            raise ValueError(
                f"the KV page pool has {pages} pages of {self.page_size} tokens; one request of "
                f"{self.context(cfg)} tokens needs {needed - 1} plus the scratch page: raise "
                f"kv_cache_gb / num_pages or lower max_seq_len"
            )
        return pages
