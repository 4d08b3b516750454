"""What the machine gives: measured memory bandwidth, peak RSS, thread pinning."""

from __future__ import annotations

import os
import resource
import sys
import time
from collections.abc import Callable

import numpy as np


def pin_threads(threads: int) -> None:
    """Restricts this process (and the thread pools it starts later) to `threads` cores."""
    cores = sorted(os.sched_getaffinity(0))
    if threads > len(cores):
        raise ValueError(f"threads={threads}, but this process may use only {len(cores)} cores")
    os.sched_setaffinity(0, cores[:threads])


def peak_rss_bytes() -> int:
    """This process's peak resident set size. On Linux, VmHWM: getrusage's ru_maxrss keeps the
    parent's peak across fork and exec, so a child started by a big parent would report that."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # macOS reports bytes, Linux KiB


def best_seconds(fn: Callable[[], object], repeats: int) -> float:
    """The fastest of `repeats` timed calls of fn (after one untimed warm-up call)."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def memory_bandwidth(mib: int = 512, repeats: int = 5) -> dict:
    """Bytes/s the machine streams, measured three ways on `mib` MiB arrays (best of `repeats`):

    - "numpy copy": one thread, counts the bytes read plus the bytes written;
    - "jax sum": XLA:CPU's multi-threaded read of an fp32 array (what decoding does with weights);
    - "jax matvec": x[1, 1024] @ W[1024, n] in fp32, the decode step's weight read itself.

    Returns each figure in GB/s and, as `gbps`, the largest, with its method's name.
    """
    import jax
    import jax.numpy as jnp

    n = mib * 2**20 // 4
    src = np.ones(n, np.float32)
    dst = np.empty_like(src)  # the warm-up copy touches it, so page faults stay untimed
    figures = {"numpy copy": 2 * src.nbytes / best_seconds(lambda: np.copyto(dst, src), repeats)}
    weights = jnp.asarray(src.reshape(1024, -1))
    src = dst = None  # frees both before the jax measurements
    total = jax.jit(jnp.sum)
    figures["jax sum"] = weights.nbytes / best_seconds(
        lambda: total(weights).block_until_ready(), repeats)
    x = jnp.ones((1, 1024), jnp.float32)
    matvec = jax.jit(jnp.matmul)
    figures["jax matvec"] = weights.nbytes / best_seconds(
        lambda: matvec(x, weights).block_until_ready(), repeats)
    method = max(figures, key=figures.get)
    return {"gbps": figures[method] / 1e9, "method": method,
            "all_gbps": {k: v / 1e9 for k, v in figures.items()}, "array_mib": mib}


# The /proc/cpuinfo flags that decide which kernels run (ours and llama.cpp's).
ISA_FLAGS = ("avx", "avx2", "fma", "f16c", "avx_vnni", "avx512f", "avx512bw", "avx512vl",
             "avx512_vnni", "avx512_bf16", "amx_tile", "amx_int8")


def cpu() -> dict:
    """The CPU's model and instruction-set flags, the paths jaxinfer's CPU kernels can take
    here, and the seconds a build of those kernels takes (None without a compiler). The build
    is timed afresh into a temporary file, which becomes the cached library if there is none
    yet, so a cold machine builds once."""
    import tempfile
    from pathlib import Path

    from jaxinfer.kernels.cpu import build

    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model = value.strip()
                break
    except OSError:
        pass
    flags = set(build.cpu_flags().split())
    build_s, cxx = None, build.compiler()
    if cxx is not None:
        cached = build.library_path(cxx)
        cached.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=cached.parent) as tmp:
            start = time.perf_counter()
            build.build(cxx, Path(tmp) / "lib.so")
            build_s = time.perf_counter() - start
            if not cached.exists():
                os.replace(Path(tmp) / "lib.so", cached)
    return {"model": model, "isa_flags": [f for f in ISA_FLAGS if f in flags],
            "kernel_isas": build.available_isas(), "kernel_build_s": build_s}
