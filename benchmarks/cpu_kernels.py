"""The CPU kernels (jaxinfer.kernels.cpu) against XLA's own products, in one process.

1. SmolLM2's product shapes (an MLP gate [1,536 out x 576 in], its down projection
   [576 x 1,536] and the tied lm head [49,152 x 576]) per weight format at 1 / 8 / 32 rows:
   ms and weight GB/s (values + scales + zeros as stored) for the kernel with int8 and fp32
   activations and for XLA's path (`quant.einsum` on the plain QArray).
2. SmolLM2-135M decode tok/s at batch 1 / 8 / 32 per weight format, with cpu_kernels int8
   and off (f32 activations lose to int8 by 10x and more in the products already).

    python benchmarks/cpu_kernels.py [--decode_tokens 32] [--skip_decode]

The 1-minute load average is printed with each table: on a shared machine read the ratios.
"""

from __future__ import annotations

import argparse
import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np

import jaxinfer
from jaxinfer import quant
from jaxinfer.bench.machine import best_seconds
from jaxinfer.kernels import cpu


def best(fn, *args, repeats=10) -> float:
    return best_seconds(lambda: jax.block_until_ready(fn(*args)), repeats)


def products(out: int, in_dim: int) -> None:
    rng = np.random.default_rng(0)
    w = rng.standard_normal((in_dim, out)).astype(np.float32)  # [in, out], as the model holds it
    formats = {"int8/channel": dict(precision="int8"),
               "int8/32 (Q8_0)": dict(precision="int8", group=32),
               "int4/32 (Q4_1)": dict(precision="int4", group=32)}
    print(f"\n[{out} out x {in_dim} in] product, ms (weight GB/s); load {os.getloadavg()[0]:.2f}")
    print("| format | rows | XLA path | kernel, int8 act. | kernel, f32 act. | int8 speed-up |")
    print("|---|---|---|---|---|---|")
    for name, kw in formats.items():
        q = quant.quantize(jnp.asarray(w), axis=-2, **kw)
        for rows in (1, 8, 32):
            x = jnp.asarray(rng.standard_normal((rows, in_dim)).astype(np.float32))
            xla = best(jax.jit(lambda x, q: quant.einsum("rd,df->rf", x, q)), x, q)
            kernel = {act: best(jax.jit(lambda x, q, act=act: quant.einsum(
                "rd,df->rf", x, quant.InPlace(q, None, act))), x, q) for act in cpu.ACTIVATIONS}
            cells = [f"{t * 1e3:.2f} ({q.nbytes / t / 1e9:.1f})"
                     for t in (xla, kernel["int8"], kernel["f32"])]
            print(f"| {name} | {rows} | {' | '.join(cells)} | {xla / kernel['int8']:.1f}x |")
    t = best(jax.jit(lambda x, w: x @ w), jnp.ones((1, in_dim)), jnp.asarray(w))
    print(f"fp32 x @ W at 1 row: {t * 1e3:.2f} ms ({w.nbytes / t / 1e9:.1f} GB/s)")


def decode(decode_tokens: int, formats: list[str]) -> None:
    print(f"\nSmolLM2-135M decode tok/s ({decode_tokens} new tokens per row, greedy)")
    print("| weights | cpu_kernels | batch 1 | batch 8 | batch 32 | load |")
    print("|---|---|---|---|---|---|")
    for fmt in (None if f == "none" else f for f in formats):
        model = jaxinfer.load_model(dtype="float32", quant=fmt, progress=False)
        prompt = model.tokenizer.encode("Write a short story about a lighthouse keeper.")
        for mode in ("int8", "off") if fmt else ("off",):
            cfg = dataclasses.replace(model.config, cpu_kernels=mode)
            rates = []
            for batch in (1, 8, 32):
                runs = [jaxinfer.generate(model.params, [prompt] * batch, cfg,
                                          max_new_tokens=decode_tokens) for _ in range(3)]
                result = min(runs[1:], key=lambda r: r.timings["decode"])
                rates.append(batch * (decode_tokens - 1) / result.timings["decode"])
            cells = " | ".join(f"{r:.1f}" for r in rates)
            print(f"| {fmt or 'fp32'} | {mode} | {cells} | {os.getloadavg()[0]:.2f} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--decode_tokens", type=int, default=32)
    parser.add_argument("--skip_decode", action="store_true")
    parser.add_argument("--skip_products", action="store_true")
    parser.add_argument("--formats", default="none,int8,gguf", help="decode weight formats")
    args = parser.parse_args()
    print(f"kernels: {cpu.available()}, instruction sets {cpu.available_isas()}, "
          f"jax {jax.__version__}")
    for out, in_dim in ((1536, 576), (576, 1536), (49152, 576)):
        if not args.skip_products:
            products(out, in_dim)
    if not args.skip_decode:
        decode(args.decode_tokens, args.formats.split(","))


if __name__ == "__main__":
    main()
