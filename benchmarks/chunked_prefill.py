"""Inter-token latency of running streams while a long prompt arrives, with and without
chunked prefill (the engine and scheduler in process, SmolLM2, greedy).

    python benchmarks/chunked_prefill.py --long_len 4000 --chunks 256,8192

For each --chunks value (`max_num_batched_tokens`; one at least the long prompt's length
means no chunking: the prompt is one prefill call), --streams requests decode; their
inter-token latency (the gap between two deliveries over the tokens delivered, as the
server's `inter_token_latency_seconds` counts it) is measured for --quiet_s seconds alone
(p50 "without"), then while a --long_len-token prompt is prefilled, from its submission to
its first token (p99 "during"). Each configuration runs the scenario twice and reports the
second, so that compiling stays out of the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import threading
import time

import numpy as np

import jaxinfer
from jaxinfer.checkpoints import sources
from jaxinfer.serving import EngineConfig
from jaxinfer.serving.engine import Engine
from jaxinfer.serving.scheduler import Output, Request, Scheduler


class Stream:
    """A sink that timestamps every delivery of new tokens."""

    def __init__(self):
        self.deliveries: list[tuple[float, int]] = []  # (time, tokens)
        self.done = threading.Event()

    def __call__(self, output: Output) -> None:
        if output.token_ids:
            self.deliveries.append((time.perf_counter(), len(output.token_ids)))
        if output.finish_reason:
            self.done.set()

    def gaps(self, start: float, end: float, one_more: bool = False) -> list[float]:
        """Per-token latencies of the deliveries that arrived in [start, end] (`one_more`: and
        of the first one after `end`)."""
        out = []
        for (t0, _), (t1, n) in zip(self.deliveries, self.deliveries[1:], strict=False):
            if start <= t1 <= end or (one_more and t1 > end):
                out += [(t1 - t0) / n] * n
                if t1 > end:
                    break
        return out


def scenario(scheduler: Scheduler, args, long_prompt: list[int]) -> dict:
    tokenizer = scheduler.tokenizer
    streams, ids = [Stream() for _ in range(args.streams)], []
    for i, sink in enumerate(streams):  # counting prompts: long continuations without a stop
        prompt = tokenizer.encode(", ".join(str(100 * i + j) for j in range(1, 8)) + ",")
        request = Request(prompt, args.stream_tokens, sink=sink)
        scheduler.submit(request)
        ids.append(request.id)
    time.sleep(2.0)  # every stream admitted and decoding
    quiet_start = time.perf_counter()
    time.sleep(args.quiet_s)
    arrival = time.perf_counter()
    long = Stream()
    scheduler.submit(request := Request(long_prompt, 2, sink=long))
    ids.append(request.id)
    while not long.deliveries and not long.done.is_set():
        time.sleep(0.001)
    first = long.deliveries[0][0]
    time.sleep(1.0)
    for request_id in ids:
        scheduler.abort(request_id)
    for sink in [*streams, long]:
        sink.done.wait(60)
    if any(s.deliveries[-1][0] < first for s in streams):
        raise RuntimeError("a stream ended before the long prompt's first token; raise "
                           "--stream_tokens")
    # The gaps ending in [arrival, first token], and the delivery after it: the one that
    # spans the end of an unchunked prefill.
    during = [g for s in streams for g in s.gaps(arrival, first, one_more=True)]
    quiet = [g for s in streams for g in s.gaps(quiet_start, arrival)]
    ms = lambda xs, q: float(np.percentile(xs, q) * 1e3)  # noqa: E731
    return {"itl_p50_ms_without": ms(quiet, 50), "itl_p99_ms_without": ms(quiet, 99),
            "itl_p50_ms_during": ms(during, 50), "itl_p99_ms_during": ms(during, 99),
            "itl_max_ms_during": max(during) * 1e3, "long_ttft_s": first - arrival,
            "p99_during_over_p50_without": ms(during, 99) / ms(quiet, 50)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=sources.DEFAULT_MODEL)
    parser.add_argument("--long_len", type=int, default=4000)
    parser.add_argument("--chunks", default="256,8192",
                        type=lambda s: [int(x) for x in s.split(",")])
    parser.add_argument("--streams", type=int, default=3)
    parser.add_argument("--stream_tokens", type=int, default=2000)
    parser.add_argument("--quiet_s", type=float, default=3.0)
    parser.add_argument("--decode_steps", type=int, default=4)
    parser.add_argument("--json_out", default=None)
    args = parser.parse_args()

    model = jaxinfer.load_model(args.model, progress=False)
    rng = np.random.default_rng(0)
    rows = []
    for chunk in args.chunks:
        config = EngineConfig(max_batch_size=4, max_seq_len=args.long_len + 512,
                              decode_steps=args.decode_steps, max_num_batched_tokens=chunk,
                              num_pages=args.long_len // 16 * 2 + 512,
                              enable_prefix_caching=False)
        scheduler = Scheduler(Engine(model, config))
        scheduler.start()
        warm = Stream()  # compiles the short prompts' bucket and the decode widths
        scheduler.submit(Request(model.tokenizer.encode("1, 2, 3,"), 8, sink=warm))
        warm.done.wait(600)
        try:
            # The first compiles (a prompt of two chunks and a bit needs every program).
            for length in (min(args.long_len, 2 * chunk + 8), args.long_len):
                prompt = [int(t) for t in rng.integers(100, 20000, size=length)]
                load = os.getloadavg()[0]
                result = scenario(scheduler, args, prompt)
            rows.append({"max_num_batched_tokens": chunk, "load_avg": load, **result})
            print(json.dumps(rows[-1]), flush=True)
        finally:
            scheduler.stop(60)
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
