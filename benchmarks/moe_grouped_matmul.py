"""The MoE experts' grouped products against their peers, on whatever backend jax has.

For one layer's routed experts (x [tokens, embed] -> sum over each token's k experts), times:
- tiles: `moe.grouped_matmul(impl="tiles")`, the CPU default (one product per tile of one
  expert, only the tiles in use);
- ragged: `jax.lax.ragged_dot` (XLA's grouped GEMM on GPU/TPU; a masked product over every
  expert on CPU);
- dense: every token through every expert, then weighted (the per-expert dense reference).
Prints ms per call (best of --repeats) and each one's ratio to dense, per token count.

    python benchmarks/moe_grouped_matmul.py --tokens=1,8,64,512 --experts=8 --top_k=2
"""

from __future__ import annotations

import argparse
import os

import jax
import jax.numpy as jnp
import numpy as np

from jaxinfer.bench.machine import best_seconds
from jaxinfer.models import moe


def dense_experts(x, experts, weights, w_gate, w_up, w_down):
    """Every token through every expert: [experts, tokens, ...], then the chosen ones' sum."""
    gate = jnp.einsum("td,edf->etf", x, w_gate)
    out = jnp.einsum("etf,efd->etd", jax.nn.silu(gate) * jnp.einsum("td,edf->etf", x, w_up),
                     w_down)
    combine = jnp.zeros((x.shape[0], w_gate.shape[0]), x.dtype).at[
        jnp.arange(x.shape[0])[:, None], experts].add(weights)
    return jnp.einsum("te,etd->td", combine, out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", default="1,8,64,512")
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top_k", type=int, default=2)
    parser.add_argument("--embed", type=int, default=1024)
    parser.add_argument("--expert_mlp", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    E, D, F = args.experts, args.embed, args.expert_mlp
    w = [jnp.asarray(rng.standard_normal(s).astype(np.float32) * 0.02)
         for s in ((E, D, F), (E, D, F), (E, F, D))]
    print(f"backend {jax.default_backend()}, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f};"
          f" experts {E}, top-{args.top_k}, embed {D}, expert mlp {F}, fp32")
    print(f"{'tokens':>6} {'dense ms':>9} {'tiles ms':>9} {'ragged ms':>10} "
          f"{'tiles/dense':>12} {'ragged/dense':>13} {'max |tiles - dense|':>20}")
    for tokens in map(int, args.tokens.split(",")):
        x = jnp.asarray(rng.standard_normal((tokens, D)).astype(np.float32))
        scores = jax.nn.softmax(jnp.asarray(rng.standard_normal((tokens, E)), jnp.float32))
        weights, experts = jax.lax.top_k(scores, args.top_k)
        runs = {
            "dense": jax.jit(dense_experts),
            **{impl: jax.jit(lambda *a, impl=impl: moe.routed_experts(*a, impl=impl))
               for impl in ("tiles", "ragged")},
        }
        inputs = (x, experts, weights, *w)
        outs = {name: f(*inputs) for name, f in runs.items()}
        ms = {name: 1e3 * best_seconds(lambda f=f, a=inputs: jax.block_until_ready(f(*a)),
                                       args.repeats) for name, f in runs.items()}
        error = float(jnp.abs(outs["tiles"] - outs["dense"]).max())
        print(f"{tokens:>6} {ms['dense']:>9.3f} {ms['tiles']:>9.3f} {ms['ragged']:>10.3f} "
              f"{ms['tiles'] / ms['dense']:>12.2f} {ms['ragged'] / ms['dense']:>13.2f} "
              f"{error:>20.1e}")


if __name__ == "__main__":
    main()
