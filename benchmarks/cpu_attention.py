"""The CPU attention path (blocked.py) beside the full-cache reference it replaced, same run.

    python benchmarks/cpu_attention.py [--live 256] [--caches 512,4096] [--batches 1,8]
                                       [--prefill 128,512,2048] [--repeats 5]

Decode: one SmolLM2-135M (fp32) decode step, `live` tokens in the cache, at several allocated
cache lengths: with blocked attention the step should cost the same whatever the allocation.
Prefill: the attention of all 30 layers for a prompt of n tokens (cache n + 16, as generate()
allocates it), blocked vs reference, beside the whole model's prefill, so the attention share
of prefill is visible. "reference" is `reference.attention` over the whole cache (what
`--attention=xla` ran before blocked.py), swapped in for the comparison only.
"""

from __future__ import annotations

import argparse
import os

import jax
import jax.numpy as jnp
import numpy as np

import jaxinfer
from jaxinfer.bench.machine import best_seconds
from jaxinfer.cache import KVCache
from jaxinfer.models import llama
from jaxinfer.pallas import blocked, reference


def seconds(fn, repeats: int) -> float:
    """Best wall time of `repeats` calls after a warm-up (compile) call."""
    return best_seconds(lambda: jax.block_until_ready(fn()), repeats)


def full_cache_reference(q, k, v, q_positions, *, layer=None, scales=None, **options):
    assert scales is None, "the comparison runs a float cache"
    if layer is not None:
        k, v = k[layer], v[layer]
    return reference.attention(q, k, v, q_positions, **options)


IMPLS = {"blocked": blocked.attention, "reference": full_cache_reference}


def with_attention(impl: str, fn):
    """fn traced with `impl` as the XLA attention (each impl compiles its own program)."""
    def call(*args):
        saved, blocked.attention = blocked.attention, IMPLS[impl]
        try:
            return fn(*args)
        finally:
            blocked.attention = saved
    return call


def decode_rows(model, args) -> list[str]:
    cfg, params = model.config, model.params
    rows = []
    for batch in args.batches:
        for cache_len in args.caches:
            tokens = jnp.ones((batch, 1), jnp.int32)
            positions = jnp.full((batch, 1), args.live - 1, jnp.int32)
            times = {}
            for impl in IMPLS:
                # The cache donated and carried from step to step, as generate() does.
                step = jax.jit(with_attention(impl, lambda p, t, pos, c: llama.forward(
                    p, t, pos, c, cfg)), donate_argnums=3)
                state = {"cache": KVCache.init(cfg, batch, cache_len)}

                def call(step=step, state=state, tokens=tokens, positions=positions):
                    logits, state["cache"] = step(params, tokens, positions, state["cache"])
                    return logits

                times[impl] = seconds(call, args.repeats)
            rows.append(f"| decode step, batch {batch}, {args.live} live / {cache_len} "
                        f"allocated | {times['blocked'] * 1e3:.2f} ms | "
                        f"{times['reference'] * 1e3:.2f} ms | "
                        f"{times['reference'] / times['blocked']:.2f}x |")
            print(rows[-1], flush=True)
    return rows


def prefill_rows(model, args) -> list[str]:
    cfg, params = model.config, model.params
    rng = np.random.default_rng(0)
    rows = []
    for n in args.prefill:
        cache_len = n + 16
        q = jnp.asarray(rng.standard_normal((1, n, cfg.n_heads, cfg.head_dim)), jnp.float32)
        k, v = (jnp.asarray(rng.standard_normal((1, cfg.n_kv_heads, cache_len, cfg.head_dim)),
                            jnp.float32) for _ in range(2))
        positions = jnp.arange(n, dtype=jnp.int32)[None]
        times = {}
        for impl in IMPLS:
            attend = jax.jit(IMPLS[impl])
            inputs = (q, k, v, positions)
            times[impl] = cfg.n_layers * seconds(lambda a=attend, x=inputs: a(*x), args.repeats)
        tokens = jnp.asarray(rng.integers(100, cfg.vocab_size, (1, n)), jnp.int32)
        whole = jax.jit(lambda p, t, pos, c: llama.transformer(p, t, pos, c, cfg)[0])
        inputs = (params, tokens, positions, KVCache.init(cfg, 1, cache_len))
        model_s = seconds(lambda w=whole, x=inputs: w(*x), args.repeats)
        rows.append(f"| prefill attention, {n} tokens, {cfg.n_layers} layers | "
                    f"{times['blocked'] * 1e3:.1f} ms | {times['reference'] * 1e3:.1f} ms | "
                    f"{times['reference'] / times['blocked']:.2f}x | whole prefill (blocked) "
                    f"{model_s * 1e3:.0f} ms, {n / model_s:.0f} tok/s |")
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ints = lambda s: [int(x) for x in s.split(",") if x]  # noqa: E731
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--live", type=int, default=256)
    parser.add_argument("--caches", type=ints, default=[512, 4096])
    parser.add_argument("--batches", type=ints, default=[1, 8])
    parser.add_argument("--prefill", type=ints, default=[128, 512, 2048])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    model = jaxinfer.load_model(args.model, dtype="float32", progress=False)
    print(f"load average before: {os.getloadavg()[0]:.2f}")
    print("| what | blocked | reference | reference / blocked | |\n|---|---|---|---|---|")
    rows = decode_rows(model, args) + prefill_rows(model, args)
    print(f"load average after: {os.getloadavg()[0]:.2f}; {len(rows)} rows, best of "
          f"{args.repeats}")


if __name__ == "__main__":
    main()
