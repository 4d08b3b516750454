"""Builds the CPU kernels with the system C++ compiler on first use and registers them.

The shared library is cached under the user's cache directory, keyed by the sources, the
CPU's feature flags, the compiler and the jaxlib version (whose FFI headers it includes), so
it is built once per machine (about 10 s on 2 cores). Each translation unit in `src/` targets
one instruction set; which one runs is decided at run time from CPUID and XGETBV. Two
processes building at once each write their own temporary file and rename it into place.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import jax
import jaxlib

log = logging.getLogger(__name__)

SRC = Path(__file__).resolve().parent / "src"
# (object name, source, flags): one object per instruction set.
UNITS = (
    ("scalar", "isa_scalar.cc", ()),
    ("avx2", "isa_avx2.cc", ("-mavx2", "-mfma")),
    ("avx2vnni", "isa_avx2.cc", ("-mavx2", "-mfma", "-mavxvnni")),
    ("avx512", "isa_avx512.cc", ("-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni",
                                  "-mfma")),
    ("attention_scalar", "attention.cc", ("-DJAXINFER_ISA=scalar",)),
    ("attention_avx2", "attention.cc", ("-mavx2", "-mfma", "-DJAXINFER_ISA=avx2")),
    ("attention_avx512", "attention.cc", ("-mavx512f", "-mavx512bw", "-mavx512vl", "-mfma",
                                          "-DJAXINFER_ISA=avx512")),
    ("ffi", "ffi.cc", ()),
)
COMMON_FLAGS = ("-O3", "-std=c++17", "-fPIC", "-fvisibility=hidden", "-fno-math-errno")
TARGETS = {"jaxinfer_qmatmul": "JaxinferQMatmul", "jaxinfer_attention": "JaxinferAttention"}
# Instruction-set numbers of the handler's `isa` attribute (0: the best available).
ISAS = {"scalar": 1, "avx2": 2, "avx2vnni": 3, "avx512vnni": 4}

_lock = threading.Lock()
_state: dict = {}  # "lib" once loaded, or "error" once failed


def compiler() -> str | None:
    return shutil.which("g++") or shutil.which("c++")


def cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def cache_key(cxx: str) -> str:
    h = hashlib.sha256()
    for path in sorted(SRC.iterdir()):
        h.update(path.name.encode() + path.read_bytes())
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout
    for part in (repr(UNITS), repr(COMMON_FLAGS), cpu_flags(), jaxlib.__version__, version):
        h.update(part.encode())
    return h.hexdigest()[:16]


def library_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "jaxinfer" / "kernels"


def library_path(cxx: str) -> Path:
    """Where the library for these sources, this CPU and this compiler is cached."""
    return library_dir() / f"jaxinfer_cpu_{cache_key(cxx)}.so"


def build(cxx: str, out: Path) -> None:
    """Compiles every unit (in parallel) and links them into `out`, atomically."""
    out.parent.mkdir(parents=True, exist_ok=True)
    include = jax.ffi.include_dir()
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".build-") as tmp:
        procs = []
        for name, source, flags in UNITS:
            obj = Path(tmp) / f"{name}.o"
            cmd = [cxx, *COMMON_FLAGS, *flags, f"-I{include}", "-c", str(SRC / source),
                   "-o", str(obj)]
            procs.append((cmd, subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)))
        for cmd, proc in procs:
            _, err = proc.communicate()
            if proc.returncode:
                raise RuntimeError(f"{' '.join(cmd[-3:])} failed: {err.strip()[-2000:]}")
        lib = Path(tmp) / "lib.so"
        objs = [str(Path(tmp) / f"{name}.o") for name, _, _ in UNITS]
        link = subprocess.run([cxx, "-shared", "-o", str(lib), *objs], capture_output=True,
                              text=True)
        if link.returncode:
            raise RuntimeError(f"linking failed: {link.stderr.strip()[-2000:]}")
        os.replace(lib, out)


def load() -> ctypes.CDLL | None:
    """The kernel library, built if needed and registered with XLA; None (after one warning)
    when there is no compiler or the build fails."""
    with _lock:
        if "lib" in _state or "error" in _state:
            return _state.get("lib")
        try:
            cxx = compiler()
            if cxx is None:
                raise RuntimeError("no C++ compiler (g++) found")
            path = library_path(cxx)
            if not path.exists():
                build(cxx, path)
            lib = ctypes.CDLL(str(path))
            for target, symbol in TARGETS.items():
                capsule = jax.ffi.pycapsule(getattr(lib, symbol))
                jax.ffi.register_ffi_target(target, capsule, platform="cpu")
            _state["lib"] = lib
        except (OSError, RuntimeError, subprocess.SubprocessError) as e:
            _state["error"] = str(e)
            log.warning("CPU kernels unavailable, using the XLA path: %s", str(e).splitlines()[0])
        return _state.get("lib")


def available_isas() -> list[str]:
    """The instruction-set paths this CPU and OS allow (empty when the kernels did not load)."""
    lib = load()
    if lib is None:
        return []
    mask = lib.jaxinfer_cpu_isas()
    return [name for name, bit in ISAS.items() if mask & (1 << bit)]
