"""The program runtime both `generate()` and the serving engine call through: shape buckets,
ahead-of-time compilation (timed, with optional progress lines on stderr), the persistent
compilation cache, the count of compiled programs, and the eager (no-jit) debug mode.

A program is a jitted function plus its static arguments; each new combination of argument
shapes, dtypes and shardings compiles once, here, and later calls reuse the executable.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from pathlib import Path

import jax
import numpy as np

from jaxinfer.progress import line as progress_line

log = logging.getLogger(__name__)
_executables: dict = {}  # (function, static args, argument layout, mesh) -> compiled program
_cache_dir: str | None = None


def bucket(n: int, minimum: int = 1, cap: int | None = None) -> int:
    """The smallest power of two >= max(n, minimum), capped at `cap`."""
    size = max(minimum, 1 << (max(n, 1) - 1).bit_length())
    return min(size, cap) if cap else size


def compiled_programs(*functions) -> int:
    """How many programs this process has compiled: of these jitted `functions`, or of all."""
    return sum(1 for key in _executables if not functions or key[0] in functions)


def forget_compiled() -> None:
    """Drops every compiled program this process holds (here and in jax's own caches).

    Each XLA:CPU program keeps its machine code in memory mappings of its own until it is
    freed, and the kernel allows a process 65,530 of them (vm.max_map_count). A process that
    compiles without end (the test suite, one model after another) runs out, and XLA then
    crashes (SIGSEGV or SIGABRT, seen in serializing a program for the persistent cache).
    The persistent cache makes the programs cheap to load again."""
    _executables.clear()
    jax.clear_caches()


def run(jitted, args: tuple, static: dict, what: str, *, mesh=None, timings: dict | None = None,
        progress: bool = False, eager: bool = False):
    """Calls `jitted(*args, **static)` through an ahead-of-time executable, compiling (and
    timing: `timings["compile"]` grows by the seconds) only for a new argument layout.

    `mesh`: run under `jax.set_mesh(mesh)`. `eager`: run the same Python code op by op under
    `jax.disable_jit()` (for stepping through in a debugger; nothing is compiled or cached).
    """
    with jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext():
        if eager:
            with jax.disable_jit():
                return jitted(*args, **static)
        return compiled(jitted, args, static, what, mesh=mesh, timings=timings,
                        progress=progress)(*args)


def compiled(jitted, args: tuple, static: dict, what: str, *, mesh=None,
             timings: dict | None = None, progress: bool = False):
    """The executable `run` would call for these arguments, compiled (or read from the
    persistent cache) now if this layout is new; nothing runs. Warm-up uses it to have
    every program ready without computing on dummy inputs."""
    key = (jitted, tuple(sorted(static.items())), *signature(args), mesh)
    if key not in _executables:
        enable_compilation_cache()
        start = time.perf_counter()
        with jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext():
            _executables[key] = jitted.lower(*args, **static).compile()
        seconds = time.perf_counter() - start
        message = f"compiled {what} in {seconds:.1f}s"
        progress_line(message) if progress else log.info(message)
        if timings is not None:
            timings["compile"] = timings.get("compile", 0.0) + seconds
    return _executables[key]


def signature(tree) -> tuple:
    """What a program is compiled for, of a pytree of arguments: its structure and each
    leaf's shape, dtype and placement. jax.ShapeDtypeStructs have the signature of the
    single-device arrays they describe, so programs can be compiled before the data exists."""
    leaves, treedef = jax.tree.flatten(tree)
    return treedef, tuple((np.shape(x), np.result_type(x).name, _placement(x)) for x in leaves)


def _placement(x) -> jax.sharding.Sharding | None:
    """The sharding a program is compiled for: a mesh placement, else None (host arrays and
    single-device arrays run on the same program)."""
    sharding = getattr(x, "sharding", None)
    return sharding if isinstance(sharding, jax.sharding.NamedSharding) else None


def enable_compilation_cache(path: str | os.PathLike | None = None) -> None:
    """Turns on XLA's persistent compilation cache (default: ~/.cache/jaxinfer/xla).

    Leaves a cache directory the user already configured for jax alone. jax reads the
    directory once per process, so a different path after the first compile only warns.
    """
    global _cache_dir
    if path is None and (_cache_dir or jax.config.jax_compilation_cache_dir):
        return
    if path is None:
        base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
        path = Path(base) / "jaxinfer" / "xla"
    if _cache_dir is not None:
        if str(path) != _cache_dir:
            log.warning("compilation cache already at %s for this process; ignoring %s",
                        _cache_dir, path)
        return
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.1)
    _cache_dir = str(path)
