"""jaxinfer beside transformers on the same GGUF weights, in one run on one machine.

    python benchmarks/generate_vs_transformers.py [--repeats 3] [--threads N] [--json_out f.json]

Prompts are random token ids (seeded), so no row stops early. Timed rows are best of
--repeats after a warm-up. Decode tok/s counts only the tokens after the first (the first
comes out of prefill) and divides by decode time: jaxinfer's timings["decode"]; for
transformers, generate(min_new_tokens=max_new_tokens) minus one forward pass over the prompt.
On a shared machine, other processes' CPU use distorts torch badly (its threads spin-wait):
check the load averages printed under the table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def prompts(batch: int, length: int, seed: int = 0) -> list[list[int]]:
    return np.random.default_rng(seed).integers(100, 40_000, (batch, length)).tolist()


def best_of(repeats: int, fn) -> float:
    """The smallest of `repeats` values returned by fn()."""
    return min(fn() for _ in range(repeats))


def wall(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def ttft_child(args) -> None:
    """A fresh process on a warm compilation cache: load, then one generate(max_new_tokens=1)."""
    import jaxinfer
    from jaxinfer.generate import enable_compilation_cache

    enable_compilation_cache(args.cache_dir)
    start = time.perf_counter()
    model = jaxinfer.load_model(args.model, dtype="float32", progress=False)
    load = time.perf_counter() - start
    start = time.perf_counter()
    res = jaxinfer.generate(model.params, prompts(1, args.prompt_len), model.config,
                            max_new_tokens=1)
    ttft = time.perf_counter() - start
    print(json.dumps({"load": load, "ttft": ttft, "compile": res.timings["compile"]}))


def run_jaxinfer(args, cache_dir: str) -> dict:
    import jaxinfer
    from jaxinfer.generate import enable_compilation_cache

    enable_compilation_cache(cache_dir)  # empty: the first compile below is a cold one
    out: dict = {}
    log("jaxinfer: loading")
    start = time.perf_counter()
    model = jaxinfer.load_model(args.model, dtype="float32", progress=False)
    out["load_s"] = time.perf_counter() - start

    def gen(ids, max_new):
        return jaxinfer.generate(model.params, ids, model.config, max_new_tokens=max_new)

    long_prompt = prompts(1, args.prompt_len)
    log(f"jaxinfer: first call, prompt {args.prompt_len}, 1 new token (cold compile)")
    out["compile_s"] = gen(long_prompt, 1).timings["compile"]
    out["prefill_s"] = best_of(args.repeats, lambda: gen(long_prompt, 1).timings["prefill"])
    out["ttft_warm_s"] = best_of(args.repeats, lambda: wall(lambda: gen(long_prompt, 1)))
    log("jaxinfer: TTFT in a fresh process on the warm cache")
    child = subprocess.run(
        [sys.executable, __file__, "--ttft_child", "--cache_dir", cache_dir,
         "--model", args.model, "--prompt_len", str(args.prompt_len)],
        capture_output=True, text=True, check=True)
    out["child"] = json.loads(child.stdout.strip().splitlines()[-1])
    for batch in (1, 8):
        ids = prompts(batch, args.decode_prompt_len, seed=batch)
        log(f"jaxinfer: decode batch {batch}, warm-up (compiles)")
        first = gen(ids, args.new_tokens)
        out[f"decode_compile_b{batch}_s"] = first.timings["compile"]
        if batch == 1:
            out["greedy_tokens"] = first.tokens[0]
        steps = sum(first.lengths) - batch
        decode = best_of(args.repeats, lambda ids=ids: gen(ids, args.new_tokens).timings["decode"])
        out[f"decode_b{batch}_tok_s"] = steps / decode
    return out


def run_transformers(args) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from jaxinfer.checkpoints import sources

    torch.set_num_threads(args.threads)
    path = sources.resolve(args.model)
    out: dict = {}
    log("transformers: loading (dequantizing the GGUF)")
    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    out["load_s"] = time.perf_counter() - start

    def forward(ids):
        # Logits for the last position only, as generate() computes them (and jaxinfer does).
        return wall(lambda: model(torch.tensor(ids), logits_to_keep=1))

    def gen(ids, max_new):
        ids = torch.tensor(ids)
        return model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                              max_new_tokens=max_new, min_new_tokens=max_new,
                              pad_token_id=0, temperature=None, top_p=None, top_k=None)

    with torch.no_grad():
        long_prompt = prompts(1, args.prompt_len)
        log(f"transformers: prefill, prompt {args.prompt_len}")
        forward(long_prompt)
        out["prefill_s"] = best_of(args.repeats, lambda: forward(long_prompt))
        out["ttft_warm_s"] = best_of(args.repeats, lambda: wall(lambda: gen(long_prompt, 1)))
        for batch in (1, 8):
            ids = prompts(batch, args.decode_prompt_len, seed=batch)
            log(f"transformers: decode batch {batch}")
            first = gen(ids, args.new_tokens)
            if batch == 1:
                out["greedy_tokens"] = first[0, args.decode_prompt_len:].tolist()
            prefill = best_of(args.repeats, lambda ids=ids: forward(ids))
            total = best_of(args.repeats, lambda ids=ids: wall(lambda: gen(ids, args.new_tokens)))
            out[f"decode_b{batch}_tok_s"] = batch * (args.new_tokens - 1) / (total - prefill)
    return out


def table(args, jx: dict, hf: dict) -> str:
    p, n = args.prompt_len, args.new_tokens
    agree = next((i for i, (a, b) in enumerate(zip(jx["greedy_tokens"], hf["greedy_tokens"],
                                                   strict=True)) if a != b), n)
    rows = [  # (metric, jaxinfer, transformers, is a throughput)
        ("load (s)", jx["load_s"], hf["load_s"], False),
        (f"first-call compile, cold cache, prompt {p} (s)", jx["compile_s"], None, False),
        ("first-call compile, decode batch 1 (s)", jx["decode_compile_b1_s"], None, False),
        ("first-call compile, decode batch 8 (s)", jx["decode_compile_b8_s"], None, False),
        ("first generate in a fresh process, warm cache (s)", jx["child"]["ttft"], None, False),
        ("  of which compile (cache load) (s)", jx["child"]["compile"], None, False),
        (f"TTFT in process, compiled, prompt {p} (s)", jx["ttft_warm_s"], hf["ttft_warm_s"], False),
        (f"prefill tok/s, prompt {p}, batch 1", p / jx["prefill_s"], p / hf["prefill_s"], True),
        (f"decode tok/s, batch 1, {n} new", jx["decode_b1_tok_s"], hf["decode_b1_tok_s"], True),
        (f"decode tok/s, batch 8, {n} new", jx["decode_b8_tok_s"], hf["decode_b8_tok_s"], True),
    ]
    lines = ["| metric | jaxinfer | transformers | jaxinfer / transformers |", "|---|---|---|---|"]
    for name, a, b, rate in rows:
        ratio = f"{a / b:.2f}x" if rate and b else ""
        lines.append(f"| {name} | {a:.3f} | {'' if b is None else f'{b:.3f}'} | {ratio} |")
    lines.append(f"\ntorch threads: {args.threads}; XLA:CPU uses all {os.cpu_count()} cores; "
                 f"best of {args.repeats}; decode prompts {args.decode_prompt_len} tokens; "
                 f"greedy tokens identical for the first {agree} of {n} (batch 1).")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--prompt_len", type=int, default=512)
    parser.add_argument("--decode_prompt_len", type=int, default=32)
    parser.add_argument("--new_tokens", type=int, default=128)
    parser.add_argument("--json_out", default=None)
    parser.add_argument("--ttft_child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--cache_dir", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.ttft_child:
        return ttft_child(args)
    load_before = os.getloadavg()[0]
    if load_before > 0.5:
        log(f"warning: 1-minute load average is {load_before:.2f}; timings will be noisy")
    with tempfile.TemporaryDirectory(prefix="jaxinfer-xla-") as cache_dir:
        jx = run_jaxinfer(args, cache_dir)
    hf = run_transformers(args)
    loads = (load_before, os.getloadavg()[0])
    print(table(args, jx, hf))
    print(f"1-minute load average before/after: {loads[0]:.2f}/{loads[1]:.2f}")
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump({"args": vars(args), "load_avg": loads, "jaxinfer": jx, "transformers": hf},
                      f, indent=1)


if __name__ == "__main__":
    main()
