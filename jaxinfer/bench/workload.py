"""What every engine runs: the same prompts, lengths and batch sizes, described once."""

from __future__ import annotations

import dataclasses
import sys
import time

import numpy as np

ENGINES = ("jaxinfer", "llama_cpp", "transformers")
PEERS = ("llama_cpp", "transformers")


@dataclasses.dataclass(frozen=True)
class Workload:
    """The benchmark's workloads; engines receive it as JSON, so fields are plain data."""

    model: str  # a resolved checkpoint path: a .gguf file or a Hugging Face directory
    prompt_ids: tuple[int, ...]  # the TTFT prompt, and every row's prompt when decoding
    prefill_tokens: tuple[int, ...]  # prompt lengths for prefill tok/s (random tokens, batch 1)
    batch_sizes: tuple[int, ...]  # rows decoded together
    decode_tokens: int  # new tokens per row when decoding
    vocab_size: int
    threads: int
    repeats: int = 3  # timed runs after a warm-up; the best counts
    seed: int = 0

    def random_prompt(self, length: int) -> list[int]:
        """`length` random token ids, the same for every engine (seeded by the length)."""
        rng = np.random.default_rng([self.seed, length])
        low = min(100, self.vocab_size // 2)  # past the special tokens of most vocabularies
        return rng.integers(low, self.vocab_size, length).tolist()

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> Workload:
        tuples = {"prompt_ids", "prefill_tokens", "batch_sizes"}
        return cls(**{k: tuple(v) if k in tuples else v for k, v in data.items()})


def log(label: str, msg: str) -> None:
    """A progress line on stderr (stdout is kept for the results)."""
    print(f"[{time.strftime('%H:%M:%S')}] {label}: {msg}", file=sys.stderr, flush=True)


def best_of(fn, repeats: int) -> float:
    """The smallest of `repeats` values returned by fn()."""
    return min(fn() for _ in range(repeats))


def wall(fn) -> float:
    """Seconds fn() takes."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start
