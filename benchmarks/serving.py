"""A load generator for OpenAI-compatible servers: TTFT, TPOT, ITL, request/s and output tok/s.

    # against a running server, at fixed concurrency and at a Poisson rate:
    python benchmarks/serving.py --base_url http://127.0.0.1:8000 --concurrency 1,8,32
    python benchmarks/serving.py --base_url http://127.0.0.1:8000 --request_rate 2.0
    # start jaxinfer's server and llama.cpp's (llama-cpp-python[server]) on the same GGUF,
    # one after the other, and time jaxinfer.generate() on the same prompt first:
    python benchmarks/serving.py --launch "jaxinfer,llama.cpp" --generate_peer

Prompts are random vocabulary words, --input_len tokens each (seeded: every server and
every concurrency level gets the same prompts); each request asks for --output_len tokens
(`max_tokens`) from /v1/completions with `stream: true`, greedy. Per request: TTFT = send
to first text chunk; TPOT = (end - first chunk) / (output tokens - 1); ITL = gaps between
successive text chunks (jaxinfer streams the tokens of one decode call, --decode_steps of
them, as one chunk, so its ITL mixes near-zero and full-call gaps; TPOT is the comparable
per-token figure). Output tokens come from the `usage` the server reports when it honours
`stream_options.include_usage`, else from the number of chunks.

--dataset prefix_repetition (as vLLM's benchmark dataset of that name): every prompt is one
of --num_prefixes shared prefixes of --prefix_len tokens followed by its own --input_len
tokens, so a server with prefix caching prefills the prefix once. Before the load, two
requests with a fresh prefix and different questions are sent one after the other: the
second's TTFT against the first's is what reusing the prefix saves (rows "prefix: first" and
"prefix: second", with the `cached_tokens` the server reported).

    python benchmarks/serving.py --dataset prefix_repetition --prefix_len 1500 \
        --input_len 64 --max_seq_len 2048 --concurrency 1,8 \
        --launch "jaxinfer,jaxinfer:--noenable_prefix_caching"
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import random
import signal
import subprocess
import sys
import time

import httpx
import numpy as np


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


@dataclasses.dataclass
class Result:
    ok: bool
    ttft: float = 0.0
    e2e: float = 0.0
    output_tokens: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0  # usage.prompt_tokens_details.cached_tokens, where reported
    itl: list[float] = dataclasses.field(default_factory=list)
    error: str = ""


def random_prompts(n: int, length: int, seed: int, model: str) -> list[str]:
    """n prompts of about `length` tokens of random plain words from the model's vocabulary."""
    from jaxinfer.checkpoints import gguf_vocab, sources

    tokenizer = gguf_vocab.build(sources.resolve(model))
    words = [
        i for i in range(tokenizer.vocab_size)
        if (t := tokenizer.token_text(i)) and t.startswith("Ġ") and t[1:].isalpha()
        and t[1:].islower() and len(t) > 3
    ]
    rng = random.Random(seed)
    prompts = []
    for _ in range(n):
        ids = rng.sample(words, length)
        text = tokenizer.decode(ids)
        # Re-encoding may merge differently; trim or pad with more words to the length.
        while len(tokenizer.encode(text)) < length:
            text += tokenizer.decode([rng.choice(words)])
        while len(tokenizer.encode(text)) > length:
            text = text.rsplit(" ", 1)[0]
        prompts.append(text)
    return prompts


async def one_request(http: httpx.AsyncClient, url: str, model: str, prompt: str,
                      output_len: int, headers: dict) -> Result:
    body = {"model": model, "prompt": prompt, "max_tokens": output_len, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    chunk_times: list[float] = []
    usage = None
    try:
        async with http.stream("POST", f"{url}/v1/completions", json=body,
                               headers=headers) as response:
            if response.status_code != 200:
                return Result(False, error=f"HTTP {response.status_code}: "
                              f"{(await response.aread())[:200]!r}")
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[6:])
                usage = event.get("usage") or usage
                choices = event.get("choices") or []
                if choices and choices[0].get("text"):
                    chunk_times.append(time.perf_counter())
    except httpx.HTTPError as e:
        return Result(False, error=repr(e))
    end = time.perf_counter()
    if not chunk_times:
        return Result(False, error="no text streamed")
    tokens = usage["completion_tokens"] if usage else len(chunk_times)
    return Result(
        True, ttft=chunk_times[0] - start, e2e=end - start, output_tokens=tokens,
        prompt_tokens=usage["prompt_tokens"] if usage else 0,
        cached_tokens=((usage or {}).get("prompt_tokens_details") or {}).get("cached_tokens", 0),
        itl=list(np.diff(chunk_times)),
    )


async def run_load(url: str, model: str, prompts: list[str], output_len: int, *,
                   concurrency: int | None, rate: float | None, seed: int,
                   api_key: str | None) -> tuple[list[Result], float]:
    """All prompts at `concurrency` in flight, or arriving as a Poisson process at `rate`/s."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=1000, max_keepalive_connections=1000)
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0), limits=limits) as http:
        start = time.perf_counter()
        if rate is None:
            queue = list(prompts)
            results: list[Result] = []

            async def worker():
                while queue:
                    results.append(await one_request(http, url, model, queue.pop(0),
                                                     output_len, headers))

            await asyncio.gather(*(worker() for _ in range(concurrency or len(prompts))))
        else:
            rng = np.random.default_rng(seed)
            tasks = []
            for prompt in prompts:
                tasks.append(asyncio.create_task(
                    one_request(http, url, model, prompt, output_len, headers)))
                await asyncio.sleep(rng.exponential(1.0 / rate))
            results = list(await asyncio.gather(*tasks))
        return results, time.perf_counter() - start


def summarize(results: list[Result], duration: float) -> dict:
    ok = [r for r in results if r.ok]
    ms = lambda xs, q: float(np.percentile(xs, q) * 1e3) if len(xs) else float("nan")  # noqa: E731
    mean = lambda xs: float(np.mean(xs) * 1e3) if len(xs) else float("nan")  # noqa: E731
    ttft = [r.ttft for r in ok]
    tpot = [(r.e2e - r.ttft) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1]
    itl = [gap for r in ok for gap in r.itl]
    out_tokens = sum(r.output_tokens for r in ok)
    return {
        "requests": len(results), "failed": len(results) - len(ok),
        "duration_s": duration, "request_per_s": len(ok) / duration,
        "output_tok_per_s": out_tokens / duration,
        "mean_prompt_tokens": float(np.mean([r.prompt_tokens for r in ok])) if ok else 0,
        "mean_output_tokens": out_tokens / max(len(ok), 1),
        "mean_cached_tokens": float(np.mean([r.cached_tokens for r in ok])) if ok else 0,
        "ttft_mean_ms": mean(ttft), "ttft_p50_ms": ms(ttft, 50), "ttft_p99_ms": ms(ttft, 99),
        "tpot_mean_ms": mean(tpot), "tpot_p50_ms": ms(tpot, 50), "tpot_p99_ms": ms(tpot, 99),
        "itl_mean_ms": mean(itl), "itl_p50_ms": ms(itl, 50), "itl_p99_ms": ms(itl, 99),
        "errors": sorted({r.error for r in results if not r.ok})[:3],
    }


def generate_tpot(model: str, prompt: str, output_len: int, quant: str | None = None,
                  repeats: int = 3) -> dict:
    """jaxinfer.generate() on `prompt` (greedy, no early stop): its per-token decode time,
    the best of `repeats` warm calls, to set beside the servers' TPOT at concurrency 1."""
    import jaxinfer

    loaded = jaxinfer.load_model(model, quant=quant, progress=False)
    ids = loaded.tokenizer.encode(prompt)
    best = float("inf")
    for _ in range(repeats + 1):  # the first call compiles
        result = jaxinfer.generate(loaded.params, [ids], loaded.config,
                                   max_new_tokens=output_len)
        best = min(best, result.timings["decode"] / (result.lengths[0] - 1))
    name = "jaxinfer.generate()" + (f" --quant={quant}" if quant else "")
    return {"server": name, "mode": "batch 1", "tpot_mean_ms": best * 1e3}


# -- launching servers ------------------------------------------------------------------------


def wait_healthy(url: str, process: subprocess.Popen, timeout: float, path: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}")
        try:
            if httpx.get(f"{url}{path}", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"server not healthy after {timeout}s")


def launch(kind: str, args, port: int) -> tuple[subprocess.Popen, str]:
    """Starts jaxinfer's server ("jaxinfer" or "jaxinfer:--flag=value ...") or
    llama-cpp-python's on the same GGUF; returns it and the name requests must use."""
    from jaxinfer.checkpoints import sources

    path = str(sources.resolve(args.model))
    kind, _, extra = kind.partition(":")
    if kind == "jaxinfer":
        command = [sys.executable, "-m", "jaxinfer.launch.serve", f"--port={port}",
                   f"--model={args.model}", f"--max_batch_size={args.max_batch_size}",
                   f"--max_seq_len={args.max_seq_len}", "--max_queue_size=1024",
                   *([f"--quant={args.quant}"] if args.quant else []),
                   *args.jaxinfer_flags.split(), *extra.split()]
        name, health = args.model, "/health"
    elif kind == "llama.cpp":
        # Its server handles one request at a time; by default a new one interrupts it.
        command = [args.llama_python, "-m", "llama_cpp.server", "--model", path, "--port",
                   str(port), "--n_threads", str(args.threads), "--n_ctx",
                   str(args.max_seq_len), "--model_alias", args.model,
                   "--interrupt_requests", "False", *extra.split()]
        name, health = args.model, "/v1/models"
    else:
        raise ValueError(f"--launch {kind!r}: allowed: jaxinfer, llama.cpp")
    env = dict(os.environ)
    if kind == "llama.cpp" and args.omp_wait_policy != "default":
        env["OMP_WAIT_POLICY"] = args.omp_wait_policy.upper()  # idle OpenMP threads: spin or sleep
    log(f"starting {kind}: {' '.join(command)}")
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               env=env)
    wait_healthy(f"http://127.0.0.1:{port}", process, 600, health)
    return process, name


def stop(process: subprocess.Popen) -> None:
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()


def shared_prefix_prompts(n: int, args, seed: int) -> list[str]:
    """n prompts: one of --num_prefixes prefixes of --prefix_len tokens, then --input_len
    tokens of their own (words start with a space, so the prefix tokenizes the same)."""
    prefixes = random_prompts(args.num_prefixes, args.prefix_len, seed + 1, args.model)
    questions = random_prompts(n, args.input_len, seed, args.model)
    return [prefixes[i % len(prefixes)] + " " + q for i, q in enumerate(questions)]


def prefix_ttft(url: str, name: str, args) -> list[dict]:
    """Two requests, one after the other, with a fresh shared prefix: their TTFTs."""
    rows = []
    for label, prompt in zip(("first", "second"), shared_prefix_prompts(2, args, 9_000),
                             strict=True):
        results, duration = asyncio.run(run_load(url, name, [prompt], 4, concurrency=1,
                                                 rate=None, seed=0, api_key=args.api_key))
        rows.append({"mode": f"prefix: {label}", **summarize(results, duration)})
        log(json.dumps({k: v for k, v in rows[-1].items() if k != "errors"}))
    return rows


def bench_server(url: str, name: str, prompts: list[str], args) -> list[dict]:
    rows = []
    # One short request first: any lazy start-up cost stays out of the figures.
    asyncio.run(run_load(url, name, random_prompts(1, 16, 7_000, args.model), 4,
                         concurrency=1, rate=None, seed=0, api_key=args.api_key))
    if args.dataset == "prefix_repetition":
        rows += prefix_ttft(url, name, args)
    modes = [("concurrency", c) for c in args.concurrency]
    modes += [("rate", r) for r in args.request_rate]
    for mode, value in modes:
        n = args.num_prompts or (max(4, int(value)) if mode == "concurrency" else 32)
        log(f"{name} @ {url}: {mode} {value}, {n} requests")
        results, duration = asyncio.run(run_load(
            url, name, (prompts * (n // len(prompts) + 1))[:n], args.output_len,
            concurrency=int(value) if mode == "concurrency" else None,
            rate=value if mode == "rate" else None, seed=args.seed, api_key=args.api_key))
        rows.append({"mode": f"{mode} {value:g}", **summarize(results, duration)})
        log(json.dumps({k: v for k, v in rows[-1].items() if k != "errors"}))  # partial results
    return rows


def table(rows: list[dict]) -> str:
    columns = ["server", "mode", "requests", "failed", "request_per_s", "output_tok_per_s",
               "mean_cached_tokens", "ttft_p50_ms", "ttft_p99_ms", "tpot_mean_ms", "tpot_p50_ms",
               "tpot_p99_ms",
               "itl_mean_ms", "itl_p50_ms", "itl_p99_ms"]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = [f"{row[c]:.1f}" if isinstance(row.get(c), float) else str(row.get(c, "-"))
                 for c in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base_url", default=None, help="A running server (else --launch).")
    parser.add_argument("--launch", default="",
                        help="Servers to start in turn: jaxinfer, jaxinfer:<more flags>, "
                        "llama.cpp (comma-separated)")
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--concurrency", default="1,8,32",
                        type=lambda s: [int(x) for x in s.split(",") if x])
    parser.add_argument("--request_rate", default="",
                        type=lambda s: [float(x) for x in s.split(",") if x],
                        help="Poisson arrival rates (requests/s), e.g. 1,4")
    parser.add_argument("--num_prompts", type=int, default=0,
                        help="Requests per mode (0: max(4, concurrency), 32 at a rate).")
    parser.add_argument("--input_len", type=int, default=128)
    parser.add_argument("--dataset", default="random", choices=["random", "prefix_repetition"])
    parser.add_argument("--prefix_len", type=int, default=1500,
                        help="prefix_repetition: tokens of each shared prefix.")
    parser.add_argument("--num_prefixes", type=int, default=1,
                        help="prefix_repetition: how many shared prefixes the prompts cycle.")
    parser.add_argument("--output_len", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--api_key", default=None)
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--threads", type=int, default=os.cpu_count(),
                        help="llama.cpp's thread count.")
    parser.add_argument("--omp_wait_policy", default="default",
                        choices=["default", "passive", "active"],
                        help="OMP_WAIT_POLICY for llama.cpp (passive: idle threads sleep).")
    parser.add_argument("--llama_python", default=sys.executable,
                        help="A Python with llama-cpp-python[server] installed.")
    parser.add_argument("--max_batch_size", type=int, default=32, help="jaxinfer's slots.")
    parser.add_argument("--max_seq_len", type=int, default=512)
    parser.add_argument("--quant", default=None,
                        help="jaxinfer's weight format (its servers and the generate() peer): "
                        "int8, int4 or gguf; default: float weights.")
    parser.add_argument("--jaxinfer_flags", default="", help="More flags for jaxinfer's server.")
    parser.add_argument("--generate_peer", action="store_true",
                        help="Also time jaxinfer.generate() per token on the first prompt, "
                        "before and after the servers.")
    parser.add_argument("--json_out", default=None)
    args = parser.parse_args()

    load_before = os.getloadavg()[0]
    if args.dataset == "prefix_repetition":
        prompts = shared_prefix_prompts(16, args, args.seed)
    else:
        prompts = random_prompts(16, args.input_len, args.seed, args.model)
    rows: list[dict] = []
    if args.generate_peer:
        rows.append(generate_tpot(args.model, prompts[0], args.output_len, args.quant))
        log(json.dumps(rows[-1]))
    if args.base_url:
        rows += [{"server": args.base_url, **r}
                 for r in bench_server(args.base_url.rstrip("/"), args.model, prompts, args)]
    for kind in [k for k in args.launch.split(",") if k]:
        process, name = launch(kind, args, args.port)
        try:
            rows += [{"server": kind.replace(":--", " --"), **r}
                     for r in bench_server(f"http://127.0.0.1:{args.port}", name, prompts, args)]
        finally:
            stop(process)
    if args.generate_peer:  # again: the load on a shared machine moves during a run
        rows.append(generate_tpot(args.model, prompts[0], args.output_len, args.quant))
        rows[-1]["mode"] = "batch 1, after the servers"
    print(table(rows))
    shared = (f" after a shared {args.prefix_len}-token prefix ({args.num_prefixes} prefixes)"
              if args.dataset == "prefix_repetition" else "")
    print(f"\ninput {args.input_len} tokens{shared}, output up to {args.output_len}, greedy; "
          f"load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after")
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
