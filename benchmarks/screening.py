"""Decode ITL with input screening on vs off, at concurrency 8, on the real SmolLM2.

    python benchmarks/screening.py --rounds 4 --requests 16 --output_len 64

One server process (SmolLM2-135M-Instruct, its GGUF blocks, the serve preset's engine
settings with a short context) and one engine; the rounds alternate screening off and on
(the same ServerState, its `screen` swapped between rounds; which goes first alternates),
so both see the same machine load. "On" runs every check: request- and prompt-token-rate
limits set high enough that nothing is refused, a prompt-size limit, 32 deny-list regexes
and the heuristic injection scorer. The load is benchmarks/serving.py's client (streaming
/v1/completions, greedy); the ITL is the gap between streamed chunks, TPOT (end - first
chunk) / (tokens - 1), and the server's own `jaxinfer:inter_token_latency_seconds` mean.
Screening runs before admission on a worker thread, so its cost should show, if at all, in
TTFT rather than in ITL.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import re
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import serving as load  # noqa: E402 - benchmarks/serving.py, the load generator

MODEL = "smollm2-135m-instruct"
DENY = tuple(rf"(?i)\bforbidden topic {i}\b" for i in range(32))


def screen():
    from jaxinfer.serving.screening import Screen, ScreeningConfig

    return Screen(ScreeningConfig(requests_per_minute=1e6, prompt_tokens_per_minute=1e9,
                                  max_prompt_tokens=4096, deny_patterns=DENY,
                                  injection_threshold=0.9))


@contextlib.contextmanager
def serving(app):
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def server_itl(url: str) -> tuple[float, float]:
    """The server's ITL histogram (sum, count) so far."""
    text = httpx.get(f"{url}/metrics").text
    total = float(re.search(r"jaxinfer:inter_token_latency_seconds_sum{[^}]*} (\S+)", text)[1])
    count = float(re.search(r"jaxinfer:inter_token_latency_seconds_count{[^}]*} (\S+)",
                            text)[1])
    return total, count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=4, help="off/on pairs")
    parser.add_argument("--requests", type=int, default=16, help="per round")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--input_len", type=int, default=64)
    parser.add_argument("--output_len", type=int, default=64)
    parser.add_argument("--max_seq_len", type=int, default=512)
    args = parser.parse_args()

    import jaxinfer
    from jaxinfer.serving import EngineConfig
    from jaxinfer.serving.engine import Engine
    from jaxinfer.serving.server import ServerState, create_app

    model = jaxinfer.load_model(MODEL, quant="gguf", progress=False)
    engine = Engine(model, EngineConfig(max_batch_size=args.concurrency,
                                        max_seq_len=args.max_seq_len, page_size=16,
                                        decode_steps=4, kv_cache_gb=0.25))
    load.log("compiling ...")
    engine.warmup()
    state = ServerState(MODEL)
    state.attach(engine)
    on = screen()
    rows = {"off": [], "on": []}
    try:
        with serving(create_app(state)) as url:
            prompts = load.random_prompts(args.requests, args.input_len, 0, MODEL)
            asyncio.run(load.run_load(url, MODEL, prompts[:args.concurrency], 8,
                                      concurrency=args.concurrency, rate=None, seed=0,
                                      api_key=None))  # warm the HTTP path
            for round_ in range(args.rounds):
                # Alternating which goes first: the second of a pair meets a warmer queue.
                for name in ("off", "on") if round_ % 2 == 0 else ("on", "off"):
                    state.screen = on if name == "on" else None
                    before = server_itl(url)
                    results, duration = asyncio.run(load.run_load(
                        url, MODEL, prompts, args.output_len, concurrency=args.concurrency,
                        rate=None, seed=round_, api_key=None))
                    after = server_itl(url)
                    row = load.summarize(results, duration)
                    row["server_itl_mean_ms"] = ((after[0] - before[0])
                                                 / max(after[1] - before[1], 1) * 1e3)
                    rows[name].append(row)
                    load.log(f"round {round_} screening {name}: failed {row['failed']}, "
                             f"ITL mean {row['itl_mean_ms']:.1f} ms, TPOT mean "
                             f"{row['tpot_mean_ms']:.1f} ms, server ITL "
                             f"{row['server_itl_mean_ms']:.1f} ms, TTFT mean "
                             f"{row['ttft_mean_ms']:.1f} ms")
    finally:
        state.scheduler.stop(timeout=10)
    keys = ("itl_mean_ms", "itl_p50_ms", "itl_p99_ms", "tpot_mean_ms", "server_itl_mean_ms",
            "ttft_mean_ms", "output_tok_per_s", "failed")
    print(f"concurrency {args.concurrency}, {args.requests} requests x {args.rounds} rounds, "
          f"{args.input_len} prompt / {args.output_len} output tokens")
    print(f"{'metric':<20}{'off':>10}{'on':>10}{'on/off':>9}")
    for key in keys:
        off, on_ = (float(np.mean([r[key] for r in rows[n]])) for n in ("off", "on"))
        print(f"{key:<20}{off:>10.2f}{on_:>10.2f}{on_ / off if off else float('nan'):>9.3f}")
    # The screen's own cost per request, on this machine, for scale.
    prompt = prompts[0]
    start = time.perf_counter()
    for i in range(200):
        on.check(f"bench{i}", prompt, args.input_len)
    print(f"screen.check: {(time.perf_counter() - start) / 200 * 1e6:.0f} us per request "
          f"({args.input_len}-token prompt)")


if __name__ == "__main__":
    main()
