"""Speculative decoding on the real SmolLM2: decode tok/s without it, with n-gram drafts and
with distilled draft heads, at batch 1 and 8, on two workloads (issue 15).

    python -m jaxinfer.launch.distill --prompts=examples/data/distill_prompts.txt \\
        --output=/tmp/smollm2-draft
    python benchmarks/speculative.py --draft=/tmp/smollm2-draft \\
        --out=benchmarks/results/speculative.json

Workloads, greedy, chat template, up to --tokens new tokens per row:
(a) code editing: "rename a function in / repeat this code" on a whole 20-25 line module,
    whose answer copies its input;
(b) free chat: questions on topics none of the distillation prompts has.
Each configuration runs --repeats times after a warm-up run (which compiles); the best decode
time counts. Reported per row of the table: decode tok/s, speedup over no speculation in the
same run, model calls per token, and the acceptance rate (accepted / drafted tokens). Every
configuration's tokens are checked against no speculation's (greedy: equal, up to a near-tie
of the logits, which is reported).
"""

from __future__ import annotations

import argparse
import json
import os
import time

import jaxinfer

# Whole functions of realistic size: an edit's answer copies tens of lines of its input.
CODE = [
    '''def parse_config(path):
    """Reads a key = value file into a dict, skipping comments and blank lines."""
    settings = {}
    with open(path) as handle:
        for number, line in enumerate(handle, start=1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            if "=" not in line:
                raise ValueError(f"line {number}: expected key = value, got {line!r}")
            key, value = line.split("=", 1)
            key, value = key.strip(), value.strip()
            if value.isdigit():
                value = int(value)
            elif value.lower() in ("true", "false"):
                value = value.lower() == "true"
            settings[key] = value
    return settings


def merge_configs(base, override):
    """Returns base updated with override, without changing either."""
    merged = dict(base)
    for key, value in override.items():
        merged[key] = value
    return merged
''',
    '''class Inventory:
    """Counts items by name; counts never go below zero."""

    def __init__(self):
        self.counts = {}

    def add(self, name, amount=1):
        if amount < 0:
            raise ValueError("amount must not be negative")
        self.counts[name] = self.counts.get(name, 0) + amount

    def remove(self, name, amount=1):
        have = self.counts.get(name, 0)
        if amount > have:
            raise ValueError(f"only {have} of {name} left")
        self.counts[name] = have - amount

    def total(self):
        return sum(self.counts.values())

    def report(self):
        for name in sorted(self.counts):
            print(f"{name}: {self.counts[name]}")
''',
]
EDITS = ["Rename the function parse_config to read_config everywhere in this code and show the "
         "whole code:\n\n", "Repeat this code exactly:\n\n"]
CHAT = [
    "What do octopuses eat?", "How does a lighthouse work?", "Describe a thunderstorm.",
    "Why do owls hunt at night?", "What is the Silk Road?", "How are submarines powered?",
    "What makes coral reefs colorful?", "How is chocolate made?",
]


def workload_prompts(tokenizer, workload: str, batch: int) -> list[list[int]]:
    if workload == "code":
        texts = [EDITS[i % len(EDITS)] + CODE[i // 2 % len(CODE)] for i in range(batch)]
    else:
        texts = [CHAT[i % len(CHAT)] for i in range(batch)]
    return [tokenizer.encode(tokenizer.apply_chat_template(
        [{"role": "user", "content": t}], add_generation_prompt=True), add_bos=False)
        for t in texts]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--draft", default=None,
                        help="draft heads (launch.distill --output); without them the "
                        "draft runs are left out")
    parser.add_argument("--quant", default=None, help="weights: none (float), int8, gguf")
    parser.add_argument("--k", default="ngram:4,draft:1,draft:2",
                        help="the speculating runs, method:k each")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    quant = None if args.quant in (None, "none") else args.quant
    model = jaxinfer.load_model(args.model, quant=quant, draft=args.draft)
    runs = [("none", 1)] + [(m, int(k)) for m, k in (item.split(":")
                                                     for item in args.k.split(","))
                            if m != "draft" or args.draft]
    rows = []
    for workload in ("code", "chat"):
        for batch in map(int, args.batches.split(",")):
            prompts = workload_prompts(model.tokenizer, workload, batch)
            base = None
            for method, k in runs:
                options = dict(max_new_tokens=args.tokens, stop_token_ids=model.tokenizer.stop_ids,
                               speculative_method=method, num_speculative_tokens=k)
                jaxinfer.generate(model.params, prompts, model.config, **options)  # compiles
                best = None
                for _ in range(args.repeats):
                    result = jaxinfer.generate(model.params, prompts, model.config, **options)
                    if best is None or result.timings["decode"] < best.timings["decode"]:
                        best = result
                tokens = sum(n - 1 for n in best.lengths)  # the prefill drew each first one
                rate = tokens / best.timings["decode"]
                base = base or (rate, best)
                same = sum(a == b for a, b in zip(best.tokens, base[1].tokens, strict=True))
                drafted, accepted = sum(best.draft_tokens), sum(best.accepted_tokens)
                row = {"workload": workload, "batch": batch, "method": method,
                       "k": k if method != "none" else 0,
                       "decode_tok_s": round(rate, 2), "speedup": round(rate / base[0], 3),
                       "model_calls": best.decode_steps, "tokens": tokens,
                       "acceptance": round(accepted / drafted, 3) if drafted else None,
                       "rows_equal_to_none": f"{same}/{batch}"}
                rows.append(row)
                print(json.dumps(row), flush=True)
    load = os.getloadavg()[0]
    print(f"\nload average {load:.1f}; {args.model}, {quant or 'float32'} weights, "
          f"{args.tokens} new tokens, best of {args.repeats}\n")
    print("| workload | batch | method | k | decode tok/s | speedup | model calls | "
          "acceptance | rows equal |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['workload']} | {r['batch']} | {r['method']} | {r['k']} | "
              f"{r['decode_tok_s']} | {r['speedup']:.2f}x | {r['model_calls']} | "
              f"{r['acceptance'] if r['acceptance'] is not None else '-'} | "
              f"{r['rows_equal_to_none']} |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"load_average": load, "time": time.strftime("%Y-%m-%d %H:%M"),
                       "args": vars(args), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
