"""The deployment acceptance run on the real models (too slow for the test suite):

1. SmolLM2-135M and Gemma 3 270M served at once by one router, each answering as
   jaxinfer.generate does (greedy, the same prompts);
2. a weight update under load: N concurrent streams on SmolLM2, and one more every 2 s while
   its weights are replaced by a converted Orbax checkpoint of different values (every
   non-norm weight x1.05): failed
   or truncated streams, how many were wholly v1's / v2's answer (none may be neither), the
   new version answering afterwards, and the live device bytes before and after.

    python benchmarks/deploy_real.py --streams=64 --tokens=24
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import tempfile
import threading
import time

import httpx
import jax
import uvicorn

import jaxinfer
from jaxinfer.checkpoints import orbax
from jaxinfer.serving import EngineConfig
from jaxinfer.serving.engine import Engine
from jaxinfer.serving.router import Router

PROMPTS = ["The capital of France is", "def fibonacci(n):", "List three colors:",
           "Water boils at a temperature of"]
CONFIG = EngineConfig(max_batch_size=16, max_seq_len=128, page_size=16, num_pages=129,
                      decode_steps=4, max_queue_size=256)


def live_bytes() -> int:
    gc.collect()
    return sum(a.nbytes for a in jax.live_arrays())


def load(_name: str, path: str):
    return jaxinfer.load_model(path, dtype="float32", progress=False)


def start(_name: str, model) -> Engine:
    engine = Engine(model, CONFIG)
    engine.warmup()
    return engine


def greedy_text(model, prompt: str, tokens: int) -> str:
    ids = model.tokenizer.encode(prompt)
    result = jaxinfer.generate(model.params, [ids], model.config, max_new_tokens=tokens,
                               stop_token_ids=model.tokenizer.stop_ids)
    return model.tokenizer.decode(result.tokens[0][: result.lengths[0]])


@contextlib.contextmanager
def serving(app):
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


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--streams", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=24)
    args = parser.parse_args()
    report: dict = {}
    started = time.perf_counter()
    smollm2, gemma3 = load("", "smollm2-135m-instruct"), load("", "gemma3-270m")
    with tempfile.TemporaryDirectory() as tmp:
        scaled = jax.tree_util.tree_map_with_path(
            lambda p, x: x if "norm" in jax.tree_util.keystr(p) else x * 1.05, smollm2.params)
        v2_path = str(orbax.save(f"{tmp}/smollm2-v2", smollm2.config, scaled, smollm2.tokenizer))
        v2 = load("", v2_path)
        expected = {
            "smollm2": [greedy_text(smollm2, p, args.tokens) for p in PROMPTS],
            "gemma3": [greedy_text(gemma3, p, args.tokens) for p in PROMPTS],
            "smollm2-v2": [greedy_text(v2, p, args.tokens) for p in PROMPTS],
        }
        del v2, scaled
        report["versions_differ_on_prompts"] = sum(
            a != b for a, b in zip(expected["smollm2"], expected["smollm2-v2"], strict=True))
        router = Router(load, start, api_key="k", drain_timeout_s=600)
        router.add("smollm2", start("smollm2", smollm2))
        router.add("gemma3", start("gemma3", gemma3))
        del smollm2, gemma3
        report["load_and_warmup_s"] = round(time.perf_counter() - started, 1)
        headers = {"Authorization": "Bearer k"}
        with serving(router.app()) as url:
            def complete(model: str, prompt: str) -> str:
                body = {"model": model, "prompt": prompt, "max_tokens": args.tokens,
                        "temperature": 0}
                response = httpx.post(f"{url}/v1/completions", json=body, headers=headers,
                                      timeout=600)
                return response.json()["choices"][0]["text"]

            report["two_models_match_generate"] = {
                name: [complete(name, p) == e for p, e in zip(PROMPTS, expected[name],
                                                               strict=True)]
                for name in ("smollm2", "gemma3")}
            report["unknown_model_status"] = httpx.post(
                f"{url}/v1/completions", json={"model": "x", "prompt": "a"},
                headers=headers).status_code
            before = live_bytes()

            async def stream(client, prompt: str) -> tuple[str, str, bool]:
                body = {"model": "smollm2", "prompt": prompt, "max_tokens": args.tokens,
                        "temperature": 0, "stream": True}
                pieces, done, failed = [], False, False
                async with client.stream("POST", f"{url}/v1/completions", json=body) as r:
                    failed = r.status_code != 200
                    async for line in r.aiter_lines():
                        if line == "data: [DONE]":
                            done = True
                        elif line.startswith("data: "):
                            event = json.loads(line[6:])
                            failed |= "error" in event
                            if not failed:
                                pieces.append(event["choices"][0]["text"])
                return prompt, "".join(pieces), failed or not done

            async def under_load():
                async with httpx.AsyncClient(timeout=900, headers=headers) as client:
                    streams = [asyncio.ensure_future(stream(client, PROMPTS[i % len(PROMPTS)]))
                               for i in range(args.streams)]
                    await asyncio.sleep(1.0)
                    t0 = time.perf_counter()
                    update = asyncio.ensure_future(client.post(
                        f"{url}/v1/admin/models/smollm2/weights", json={"path": v2_path}))
                    while not update.done():  # more streams arrive while the update runs
                        await asyncio.sleep(2.0)
                        streams.append(asyncio.ensure_future(
                            stream(client, PROMPTS[len(streams) % len(PROMPTS)])))
                    update_s = time.perf_counter() - t0
                    return await update, update_s, await asyncio.gather(*streams)

            update, update_s, results = asyncio.run(under_load())
            index = {p: i for i, p in enumerate(PROMPTS)}
            counts = {"v1": 0, "v2": 0, "neither": 0, "failed_or_truncated": 0}
            for prompt, text, bad in results:
                if bad:
                    counts["failed_or_truncated"] += 1
                elif text == expected["smollm2"][index[prompt]]:
                    counts["v1"] += 1
                elif text == expected["smollm2-v2"][index[prompt]]:
                    counts["v2"] += 1
                else:
                    counts["neither"] += 1
            report["update"] = {"status": update.status_code, "body": update.json(),
                                "seconds": round(update_s, 1), "streams": counts}
            report["after_update_answers_v2"] = [
                complete("smollm2", p) == e for p, e in zip(PROMPTS, expected["smollm2-v2"],
                                                            strict=True)]
            after = live_bytes()
            report["live_device_mib_before_after"] = [round(before / 2**20, 1),
                                                      round(after / 2**20, 1)]
        router.stop()
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
