"""The eager debug mode beside the compiled one: generate() on the tiny random test model.

    python benchmarks/eager_mode.py [--new_tokens 32]

Each mode runs in a fresh process: one call that compiles (compiled mode), then the best of
--repeats calls, timed; peak RSS of the process at the end. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time


def worker(eager: bool, new_tokens: int, repeats: int) -> dict:
    import jax

    import jaxinfer
    from jaxinfer.models import llama

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
    from conftest import TINY  # the tiny random config the tests use

    params = llama.init_params(TINY, jax.random.key(0))
    prompt = [[5, 17, 99, 3, 250, 42, 7, 8]]
    start = time.perf_counter()
    first = jaxinfer.generate(params, prompt, TINY, max_new_tokens=new_tokens, eager=eager)
    first_s = time.perf_counter() - start
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        jaxinfer.generate(params, prompt, TINY, max_new_tokens=new_tokens, eager=eager)
        best = min(best, time.perf_counter() - start)
    return {"mode": "eager" if eager else "compiled", "first_call_s": first_s,
            "compile_s": first.timings["compile"], "call_s": best,
            "tok_per_s": new_tokens / best,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--new_tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--worker", choices=["eager", "compiled"])
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker == "eager", args.new_tokens, args.repeats)))
        return
    load = os.getloadavg()[0]
    rows = []
    for mode in ("compiled", "eager"):
        out = subprocess.run([sys.executable, __file__, "--worker", mode,
                              f"--new_tokens={args.new_tokens}", f"--repeats={args.repeats}"],
                             capture_output=True, text=True, check=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
    print("| mode | first call (s) | of it compiling (s) | warm call (s) | tok/s "
          "| peak RSS (MiB) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['mode']} | {r['first_call_s']:.2f} | {r['compile_s']:.2f} | "
              f"{r['call_s']:.3f} | {r['tok_per_s']:.1f} | {r['peak_rss_mib']:.0f} |")
    print(f"\n{args.new_tokens} new tokens, batch 1; load average {load:.1f} before, "
          f"{os.getloadavg()[0]:.1f} after")


if __name__ == "__main__":
    main()
