"""Where a quantized contraction's time goes on this backend: the product as the model runs
it (`jaxinfer.quant.einsum`), the dequantization alone, and the float product alone.

    python benchmarks/quant_matmul_profile.py [--rows 1,32,512] [--out_dim 23040] [--repeats 5]

"dequantize alone" writes the fp32 weight in storage order: what a product that does not
fuse the dequantization into its reads pays first. The weight is [576, out_dim] (SmolLM2's
embedding width; out_dim 23040 is 13M weights, 53 MB in fp32, past the caches), contracted
as the MLP's up projection: "...d,df->...f". Rows are batch x tokens: 1 and 32 are decode
steps, 512 a prefill. Best of --repeats, jitted.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp

from jaxinfer import quant
from jaxinfer.quant.qarray import _dequantize_stored


def best_ms(fn, *args, repeats: int) -> float:
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return 1e3 * min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", default="1,32,512")
    parser.add_argument("--out_dim", type=int, default=23040)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    w = jax.random.normal(jax.random.key(0), (576, args.out_dim), jnp.float32) * 0.05
    weights = {
        "fp32": w,
        "bf16": w.astype(jnp.bfloat16),
        "int8/channel": quant.quantize(w, "int8", axis=-2),
        "int4/32": quant.quantize(w, "int4", axis=-2, group=32),
    }
    product = jax.jit(lambda x, w: quant.einsum("...d,df->...f", x, w))
    # In storage order ([out, in]): the float copy a dequantize-then-dot makes, no transpose.
    dequantize = jax.jit(lambda w: _dequantize_stored(w, jnp.float32))
    print(f"weight [576, {args.out_dim}]; ms, best of {args.repeats} "
          f"(weight GB/s read by the product in brackets)")
    print("| rows | format | MiB | product ms | dequantize alone ms | fp32 product ms |")
    print("|---|---|---|---|---|---|")
    for rows in map(int, args.rows.split(",")):
        x = jax.random.normal(jax.random.key(1), (rows, 576), jnp.float32)
        float_ms = best_ms(product, x, w, repeats=args.repeats)
        for name, weight in weights.items():
            nbytes = sum(a.nbytes for a in jax.tree.leaves(weight))
            xw = x.astype(jnp.bfloat16) if name == "bf16" else x
            ms = best_ms(product, xw, weight, repeats=args.repeats)
            deq = (best_ms(dequantize, weight, repeats=args.repeats)
                   if quant.is_quantized(weight) else float("nan"))
            print(f"| {rows} | {name} | {nbytes / 2**20:.1f} | {ms:.2f} "
                  f"({nbytes / ms / 1e6:.1f} GB/s) | {deq:.2f} | {float_ms:.2f} |")
    print(f"backend: {jax.default_backend()}, jax {jax.__version__}")


if __name__ == "__main__":
    main()
