"""Decode throughput of grammar-constrained (structured output) vs unconstrained requests.

    python benchmarks/structured_decode.py --batch 1,32 --max_tokens 64

For each batch size B: B requests of the same chat prompt go into the serving scheduler at
once (no HTTP: the engine and scheduler alone), first unconstrained, then each constrained
to a JSON schema through llguidance (serving.structured), then both again (best of
--repeats). Greedy; ignore_eos and a wide JSON schema (free-form strings, no length limits)
keep every request at max_tokens, so both runs decode the same number of tokens. Reported:
output tokens / second of wall time after the first token (prefill excluded), and the
constrained / unconstrained ratio. Constrained requests decode one step per device call
(a grammar's mask holds for one token) and compute each row's mask on the host; that is the
overhead measured.
"""

from __future__ import annotations

import argparse
import threading
import time

import jaxinfer
from jaxinfer.checkpoints import sources
from jaxinfer.sampling import SamplingParams
from jaxinfer.serving import EngineConfig, structured
from jaxinfer.serving.engine import Engine
from jaxinfer.serving.scheduler import Request, Scheduler

SCHEMA = {"type": "object", "properties": {
    "notes": {"type": "array", "items": {"type": "string"}}}, "required": ["notes"]}


def run(scheduler: Scheduler, batch: int, max_tokens: int, constrained: bool) -> float:
    """Output tokens per second after each request's first token, over `batch` requests."""
    tokenizer = scheduler.tokenizer
    prompt = tokenizer.encode(tokenizer.apply_chat_template(
        [{"role": "user", "content": "Write notes about the sea as JSON."}]), add_bos=False)
    done = threading.Semaphore(0)
    firsts: list[float] = []
    sampling = SamplingParams(ignore_eos=True)

    def sink(output):
        if output.completion_tokens == 1 and output.token_ids:
            firsts.append(time.perf_counter())
        if output.finish_reason:
            done.release()

    requests = []
    for _ in range(batch):
        matcher = None
        if constrained:
            matcher = structured.matcher(structured.Constraint("json_schema", SCHEMA),
                                         tokenizer, scheduler.vocab_size)
        requests.append(Request(prompt, max_tokens, sampling, sink=sink, matcher=matcher))
    for request in requests:
        scheduler.submit(request)
    for _ in requests:
        done.acquire()
    end = time.perf_counter()
    tokens = sum(len(r.output_ids) - 1 for r in requests)
    return tokens / (end - max(firsts))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", default="1,32")
    parser.add_argument("--max_tokens", type=int, default=64)
    parser.add_argument("--decode_steps", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    batches = [int(b) for b in args.batch.split(",")]
    model = jaxinfer.load_model(str(sources.resolve(sources.DEFAULT_MODEL)), progress=False)
    config = EngineConfig(max_batch_size=max(batches), max_seq_len=256, page_size=16,
                          decode_steps=args.decode_steps, max_queue_size=max(batches))
    engine = Engine(model, config)
    engine.warmup()
    scheduler = Scheduler(engine)
    scheduler.start()
    try:
        for batch in batches:
            run(scheduler, batch, 8, True)  # compiles the one-step programs of this width
            best = {False: 0.0, True: 0.0}
            for _ in range(args.repeats):
                for constrained in (False, True):
                    best[constrained] = max(best[constrained],
                                            run(scheduler, batch, args.max_tokens, constrained))
            print(f"batch {batch:3d}: unconstrained {best[False]:7.1f} tok/s, constrained "
                  f"{best[True]:7.1f} tok/s, ratio {best[True] / best[False]:.2f}", flush=True)
    finally:
        scheduler.stop(timeout=30)


if __name__ == "__main__":
    main()
