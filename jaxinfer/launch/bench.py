"""Offline benchmark: `python -m jaxinfer.launch.bench [--quant=none,int8,gguf]
[--dtype=float32,bfloat16] [--peers=llama_cpp,transformers] [--json]`.

Reports load time, compile time, time to first token, prefill tok/s per prompt length, decode
tok/s per batch size, parameter bytes, peak RSS, and the weight bandwidth decoding achieves
(parameter bytes x decode steps/s) as a fraction of the machine's memory bandwidth, which it
measures first. Each engine configuration runs in a fresh process on the same token ids,
pinned to the same cores; peers (llama.cpp and transformers on the same checkpoint) run in
the same invocation and the report gives jaxinfer's speed as a ratio of theirs.

--quant and --dtype take comma-separated lists and run every combination; a quant entry may
name its own dtype ("none:bfloat16") to skip the cross product.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_string("model", "smollm2-135m-instruct", "Known model name, .gguf file or model dir.")
flags.DEFINE_string("prompt", "Write a short story about a lighthouse keeper who finds a "
                    "message in a bottle.", "Prompt for time to first token and decoding.")
flags.DEFINE_list("batch_sizes", ["1", "8", "32"], "Decode batch sizes.")
flags.DEFINE_integer("decode_tokens", 64, "New tokens per row when measuring decode.")
flags.DEFINE_list("prefill_tokens", ["128", "512", "2048"], "Prompt lengths for prefill tok/s.")
flags.DEFINE_list("quant", ["none"], "Weight formats: none, int8, int4, gguf (the file's "
                  "own quantized blocks); an entry may carry its dtype: none:bfloat16.")
flags.DEFINE_list("dtype", ["float32"], "Compute dtypes: float32, bfloat16, auto.")
flags.DEFINE_list("peers", [], "Also run: llama_cpp, transformers.")
flags.DEFINE_integer("threads", None, "Cores for every engine (default: all this process may use).")
flags.DEFINE_enum("omp_wait_policy", "default", ["default", "passive", "active"],
                  "OMP_WAIT_POLICY for the peers (llama.cpp and torch use OpenMP): passive keeps "
                  "their idle threads from spinning, which matters when other processes share "
                  "the cores; default leaves the libraries' own choice.")
flags.DEFINE_integer("repeats", 3, "Timed runs per measurement after a warm-up; the best counts.")
flags.DEFINE_integer("bandwidth_mib", 512, "Array size for measuring memory bandwidth.")
flags.DEFINE_boolean("json", False, "Print the report as one JSON object on the last line.")
flags.DEFINE_string("json_out", None, "Write the JSON report to this file.")
flags.DEFINE_string("png_out", None, "Write a bar chart (PNG) to this file.")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from jaxinfer.bench import machine, options, report, worker
    from jaxinfer.bench.workload import log
    from jaxinfer.checkpoints import sources

    cores = len(os.sched_getaffinity(0))
    threads = cores if FLAGS.threads is None else FLAGS.threads
    try:
        if not 1 <= threads <= cores:
            raise ValueError(f"--threads={threads}: this process may use 1 to {cores} cores")
        engines = options.configs(FLAGS.quant, FLAGS.dtype)
        try:
            model_path = sources.resolve(FLAGS.model)
        except (ValueError, FileNotFoundError) as e:
            raise ValueError(f"--model: {e}") from None
        engines += options.peers(FLAGS.peers, model_path)
        work = options.workload(model_path, FLAGS.prompt, FLAGS.prefill_tokens,
                                FLAGS.batch_sizes, FLAGS.decode_tokens, FLAGS.repeats, threads)
    except ValueError as e:
        raise app.UsageError(str(e)) from None
    machine.pin_threads(threads)  # the children inherit it

    load_before = os.getloadavg()[0]
    log("machine", f"memory bandwidth ({FLAGS.bandwidth_mib} MiB arrays)")
    bandwidth = machine.memory_bandwidth(FLAGS.bandwidth_mib)
    log("machine", "CPU flags and a fresh build of the CPU kernels")
    cpu = machine.cpu()
    results = []
    for i, engine in enumerate(engines, 1):
        log("bench", f"engine {i}/{len(engines)}: {report.column_name(engine)}")
        env = ({"OMP_WAIT_POLICY": FLAGS.omp_wait_policy.upper()}
               if engine["engine"] != "jaxinfer" and FLAGS.omp_wait_policy != "default" else None)
        result = worker.run(engine, work, env)
        report.add_bandwidth(result, bandwidth["gbps"])
        results.append(result)
    out = {
        "settings": {
            "model": str(model_path), "model_name": model_path.name,
            "prompt_tokens": len(work.prompt_ids), "prefill_tokens": list(work.prefill_tokens),
            "batch_sizes": list(work.batch_sizes), "decode_tokens": work.decode_tokens,
            "threads": threads, "repeats": work.repeats,
            "peer_omp_wait_policy": FLAGS.omp_wait_policy,
        },
        "machine": {"cpus": os.cpu_count(), "cpu": cpu, "bandwidth": bandwidth,
                    "load_avg_before": load_before, "load_avg_after": os.getloadavg()[0],
                    "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime())},
        "results": results,
        "ratios": report.ratios(results),
    }
    print(report.table(out))
    if FLAGS.json_out:
        Path(FLAGS.json_out).write_text(json.dumps(out, indent=1) + "\n")
    if FLAGS.png_out:
        report.chart(out, FLAGS.png_out)
    if FLAGS.json:
        print(json.dumps(out))
    if any("error" in r for r in results):
        sys.exit(1)


if __name__ == "__main__":
    app.run(main)
