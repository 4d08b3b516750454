"""Runs one engine on the workload in a fresh process, so each gets a cold start of its own,
its own peak RSS and no other engine's threads or memory: `python -m jaxinfer.bench.worker
'{"engine": ..., "workload": {...}}'` prints the result as JSON on its last stdout line."""

from __future__ import annotations

import collections
import json
import os
import signal
import subprocess
import sys
import tempfile
import time

from jaxinfer.bench.machine import peak_rss_bytes, pin_threads
from jaxinfer.bench.workload import Workload

STDERR_TAIL_LINES = 8  # of a failed child's stderr, kept in the report


def run(engine: dict, workload: Workload, env: dict[str, str] | None = None) -> dict:
    """Runs `engine` ({"engine": name, "quant": ..., "dtype": ...}) in a child process (with
    `env` added to its environment) and returns its result, or, if the child failed,
    {"error": how it died, "stderr_tail": its last stderr lines}. Its progress lines pass
    through to stderr as they come; the libraries' chatter shows only on failure."""
    spec = json.dumps({**engine, "workload": workload.to_json()})
    start = time.perf_counter()
    tail: collections.deque[str] = collections.deque(maxlen=20)
    with tempfile.TemporaryFile("w+") as stdout:
        with subprocess.Popen([sys.executable, "-m", "jaxinfer.bench.worker", spec],
                              stdout=stdout, stderr=subprocess.PIPE, text=True,
                              env={**os.environ, **(env or {})}) as child:
            step = ""
            for line in child.stderr:
                tail.append(line)
                if line.startswith("["):  # a progress line (workload.log)
                    sys.stderr.write(line)
                    step = line.strip()
        stdout.seek(0)
        lines = stdout.read().strip().splitlines()
    if child.returncode != 0 or not lines:
        sys.stderr.write("".join(tail))
        return {**engine, "error": how_it_died(child.returncode, step, list(tail)),
                "stderr_tail": [line.rstrip() for line in tail][-STDERR_TAIL_LINES:],
                "wall_s": time.perf_counter() - start}
    return {**engine, **json.loads(lines[-1]), "wall_s": time.perf_counter() - start}


def how_it_died(returncode: int, step: str, stderr_lines: list[str]) -> str:
    """"killed by SIGILL (signal 4) at [12:00:00] llama.cpp: loading; last stderr line: ...";
    a negative returncode is the signal that ended the child (Popen's convention)."""
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = "an unknown signal"
        how = f"killed by {name} (signal {-returncode})"
    elif returncode > 0:
        how = f"exit status {returncode}"
    else:
        how = "exit status 0 without printing a result"
    if step:
        how += f" at {step}"
    last = [line.strip() for line in stderr_lines if line.strip() and not line.startswith("[")]
    return how + (f"; last stderr line: {last[-1]}" if last else "")


def main(spec: str) -> None:
    from jaxinfer.bench import engines

    spec_data = json.loads(spec)
    workload = Workload.from_json(spec_data["workload"])
    pin_threads(workload.threads)
    name = spec_data["engine"]
    if name == "jaxinfer":
        result = engines.run_jaxinfer(workload, spec_data["quant"], spec_data["dtype"])
    elif name == "llama_cpp":
        result = engines.run_llama_cpp(workload)
    elif name == "transformers":
        result = engines.run_transformers(workload)
    else:
        raise ValueError(f"unknown engine {name!r}")
    result["peak_rss_bytes"] = peak_rss_bytes()
    print(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1])
