"""Pallas attention kernels beside the XLA reference path, on one accelerator.

    python benchmarks/attention_kernels.py [--dtype bfloat16] [--repeats 10] [--json_out f.json]

Prefill: causal flash attention, batch 1, 32 query heads / 8 KV heads, head_dim 128 (a
Llama-3-8B layer), at seq 2k and 8k; reported as TFLOP/s of the causal half
(2 matmuls x 2 flops x seq^2 / 2 x heads x head_dim). Decode: one new token per row against a
paged cache (page_size 16, a shuffled page table, every row at full context), batch 8/64 at
context 4k/32k; reported as GB/s of K and V read. The XLA side is what jaxinfer runs with
--attention=xla: `reference.attention` for prefill, and for decode the page gather plus dense
attention of `reference.paged_attention`.

Meant for a GPU or TPU. On CPU the kernels run interpreted and the sizes would take hours:
there `--smoke` runs tiny shapes to check the script itself.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxinfer.pallas import reference
from jaxinfer.pallas.flash_attention import flash_attention
from jaxinfer.pallas.paged_attention import paged_attention as paged_kernel

HEADS, KV_HEADS, HEAD_DIM, PAGE_SIZE = 32, 8, 128, 16


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def seconds(fn, args, repeats: int) -> float:
    """Median wall time of a compiled call (compiled and warmed up first)."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def prefill_inputs(seq: int, dtype, heads=HEADS, kv_heads=KV_HEADS, head_dim=HEAD_DIM):
    keys = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(keys[0], (1, seq, heads, head_dim), dtype)
    k = jax.random.normal(keys[1], (1, kv_heads, seq, head_dim), dtype)
    v = jax.random.normal(keys[2], (1, kv_heads, seq, head_dim), dtype)
    return q, k, v, jnp.arange(seq, dtype=jnp.int32)[None]


def decode_inputs(batch: int, context: int, dtype, heads=HEADS, kv_heads=KV_HEADS,
                  head_dim=HEAD_DIM, page_size=PAGE_SIZE):
    pages_per_seq = context // page_size
    num_pages = 1 + batch * pages_per_seq
    keys = jax.random.split(jax.random.key(1), 3)
    shape = (kv_heads, num_pages, page_size, head_dim)
    k_pages = jax.random.normal(keys[0], shape, dtype)
    v_pages = jax.random.normal(keys[1], shape, dtype)
    table = np.random.default_rng(0).permutation(np.arange(1, num_pages))
    table = jnp.asarray(table.reshape(batch, pages_per_seq), jnp.int32)
    q = jax.random.normal(keys[2], (batch, 1, heads, head_dim), dtype)
    positions = jnp.full((batch, 1), context - 1, jnp.int32)
    return q, k_pages, v_pages, table, positions


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--prefill_seqs", default="2048,8192")
    parser.add_argument("--decode_batches", default="8,64")
    parser.add_argument("--decode_contexts", default="4096,32768")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes (CPU, interpreted)")
    parser.add_argument("--json_out", default=None)
    args = parser.parse_args()
    dtype = jnp.dtype(args.dtype)
    backend = jax.default_backend()
    interpret = backend not in ("gpu", "tpu")
    if interpret and not args.smoke:
        parser.error(f"backend is {backend}: the kernels would run interpreted; use --smoke")
    seqs = [64] if args.smoke else [int(s) for s in args.prefill_seqs.split(",")]
    batches = [2] if args.smoke else [int(b) for b in args.decode_batches.split(",")]
    contexts = [128] if args.smoke else [int(c) for c in args.decode_contexts.split(",")]
    shape = dict(heads=8, kv_heads=2, head_dim=64) if args.smoke else {}
    heads, head_dim = shape.get("heads", HEADS), shape.get("head_dim", HEAD_DIM)
    kv_heads = shape.get("kv_heads", KV_HEADS)
    device = jax.devices()[0].device_kind
    log(f"device {device}, jax {jax.__version__}, {args.dtype}")

    rows = []
    flash = jax.jit(lambda q, k, v, p: flash_attention(q, k, v, p, interpret=interpret))
    dense = jax.jit(reference.attention)
    for seq in seqs:
        inputs = prefill_inputs(seq, dtype, **shape)
        flops = 4 * seq * seq / 2 * heads * head_dim
        for impl, fn in (("pallas", flash), ("xla", dense)):
            t = seconds(fn, inputs, args.repeats)
            rows.append(dict(kind="prefill", impl=impl, seq=seq, ms=t * 1e3,
                             tflops=flops / t / 1e12))
            log(f"prefill seq {seq} {impl}: {t * 1e3:.3f} ms, {flops / t / 1e12:.1f} TFLOP/s")

    paged = jax.jit(lambda *a: paged_kernel(*a, interpret=interpret))
    gathered = jax.jit(reference.paged_attention)
    for batch in batches:
        for context in contexts:
            inputs = decode_inputs(batch, context, dtype, **shape)
            kv_bytes = 2 * batch * kv_heads * context * head_dim * dtype.itemsize
            for impl, fn in (("pallas", paged), ("xla", gathered)):
                t = seconds(fn, inputs, args.repeats)
                rows.append(dict(kind="decode", impl=impl, batch=batch, context=context,
                                 ms=t * 1e3, gbps=kv_bytes / t / 1e9))
                log(f"decode batch {batch} context {context} {impl}: {t * 1e3:.3f} ms, "
                    f"{kv_bytes / t / 1e9:.0f} GB/s")

    print(f"\n{device}, jax {jax.__version__}, {args.dtype}, median of {args.repeats}\n")
    print("| attention | shape | pallas | xla | pallas / xla |\n|---|---|---|---|---|")
    for i in range(0, len(rows), 2):
        kernel, ref = rows[i], rows[i + 1]
        if kernel["kind"] == "prefill":
            what, unit, key = f"prefill seq {kernel['seq']}", "TFLOP/s", "tflops"
        else:
            what, unit, key = (f"decode batch {kernel['batch']}, context {kernel['context']}",
                               "GB/s", "gbps")
        print(f"| {kernel['kind']} | {what} | {kernel[key]:.1f} {unit} ({kernel['ms']:.2f} ms) "
              f"| {ref[key]:.1f} {unit} ({ref['ms']:.2f} ms) | {ref['ms'] / kernel['ms']:.2f}x |")
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(dict(device=device, jax=jax.__version__, dtype=args.dtype, rows=rows), f,
                      indent=1)


if __name__ == "__main__":
    main()
