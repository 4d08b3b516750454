"""Environment checks: what jax sees, whether versions fit together, and what to do if not.

Each check returns a `Check` (ok / warn / fail, what was found, and a remedy when it is not
ok). `python -m jaxinfer.launch.doctor` prints them and exits non-zero when one fails.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path

OK, WARN, FAIL = "ok", "warn", "fail"
GIB = 1 << 30
LOW_MEMORY_BYTES = 2 * GIB  # below this, even SmolLM2 in fp32 plus a KV cache is tight
# Oldest NVIDIA driver branch for each CUDA major version (CUDA release notes, table 3).
MIN_DRIVER_FOR_CUDA = {12: "525.60.13", 13: "580.65.06"}
PLUGINS = ("jax-cuda13-plugin", "jax-cuda12-plugin", "jax-cuda13-pjrt", "jax-cuda12-pjrt",
           "libtpu")
LIBRARIES = ("jax", "jaxlib", "flax", "orbax-checkpoint", *PLUGINS)


@dataclasses.dataclass(frozen=True)
class Check:
    name: str
    status: str  # OK, WARN or FAIL
    detail: str
    remedy: str = ""


def version(distribution: str) -> str | None:
    """The installed version of a distribution, or None."""
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def check_versions(versions: dict[str, str | None] | None = None) -> Check:
    """jax, jaxlib and any accelerator plugin must be one release (jax refuses mismatches)."""
    versions = versions or {name: version(name) for name in LIBRARIES}
    found = ", ".join(f"{k} {v}" for k, v in versions.items() if v)
    jax_v, jaxlib_v = versions.get("jax"), versions.get("jaxlib")
    if jax_v is None or jaxlib_v is None:
        return Check("versions", FAIL, found or "jax is not installed",
                     "install jaxinfer's dependencies: pip install -e . (or make install)")
    if jax_v != jaxlib_v:
        return Check("versions", FAIL, found, f"jax {jax_v} and jaxlib {jaxlib_v} differ; "
                     f"reinstall them together: pip install 'jax=={jax_v}' 'jaxlib=={jax_v}'")
    stale = [f"{p} {versions[p]}" for p in PLUGINS
             if p != "libtpu" and versions.get(p) and versions[p] != jaxlib_v]
    if stale:
        return Check("versions", FAIL, found,
                     f"{', '.join(stale)} does not match jaxlib {jaxlib_v}; reinstall the "
                     "accelerator extra: pip install -e '.[cuda]' (GPU) or -e '.[tpu]' (TPU)")
    return Check("versions", OK, found)


def check_devices() -> Check:
    """Which backend jax picked and its devices; a GPU jax cannot use is a failure."""
    try:
        import jax

        devices = jax.devices()
    except Exception as e:  # a broken plugin raises at backend start-up
        return Check("devices", FAIL, f"jax could not start a backend: {e}",
                     "reinstall the matching extra: pip install -e '.[cuda]' or -e '.[tpu]'; "
                     "or run on CPU with JAX_PLATFORMS=cpu")
    kinds = sorted({d.device_kind for d in devices})
    detail = (f"backend {jax.default_backend()}: {len(devices)} device(s) ({', '.join(kinds)}), "
              f"{jax.local_device_count()} local, process {jax.process_index()} of "
              f"{jax.process_count()}")
    if jax.default_backend() == "cpu" and nvidia_driver_version() is not None:
        return Check("devices", FAIL, detail + "; but nvidia-smi reports an NVIDIA GPU",
                     "jax has no CUDA plugin: pip install -e '.[cuda]' (CUDA 13; needs driver "
                     f">= {MIN_DRIVER_FOR_CUDA[13]})")
    return Check("devices", OK, detail)


def nvidia_driver_version() -> str | None:
    """The NVIDIA driver version nvidia-smi reports ("580.82.07"), or None without one."""
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version",
                              "--format=csv,noheader"], capture_output=True, text=True,
                             timeout=20, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return out.splitlines()[0].strip() if out.strip() else None


def _cuda(v: int) -> str:
    return f"{v // 1000}.{v % 1000 // 10}"


def check_cuda(
    runtime: int | None = None, driver_cuda: int | None = None, driver: str | None = None
) -> Check:
    """CUDA runtime (from jax's plugin) vs the newest CUDA the installed driver supports.

    Versions are CUDA's integers (12040 = 12.4); the driver must support the runtime's
    major version, and a lower minor works only through CUDA's minor-version compatibility.
    """
    if runtime is None:
        try:
            from jax._src.lib import cuda_versions  # present only with a CUDA plugin
        except ImportError:
            cuda_versions = None
        if cuda_versions is None:
            return Check("cuda", OK, "no CUDA plugin installed (not a GPU run)")
        try:
            runtime = cuda_versions.cuda_runtime_get_version()
            driver_cuda = cuda_versions.cuda_driver_get_version()
        except Exception as e:  # no driver library: the plugin cannot load CUDA
            return Check("cuda", FAIL, f"CUDA plugin installed but CUDA did not load: {e}",
                         "install the NVIDIA driver (nvidia-smi must work) or uninstall the "
                         "CUDA plugin to run on CPU")
        driver = driver or nvidia_driver_version()
    detail = (f"CUDA runtime {_cuda(runtime)}, driver supports CUDA "
              f"{_cuda(driver_cuda) if driver_cuda else '?'}"
              + (f" (driver {driver})" if driver else ""))
    major = runtime // 1000
    needed = MIN_DRIVER_FOR_CUDA.get(major, f"a release supporting CUDA {_cuda(runtime)}")
    if not driver_cuda or driver_cuda // 1000 < major:
        return Check("cuda", FAIL, detail,
                     f"upgrade the NVIDIA driver to >= {needed} for CUDA {major}, or install "
                     "the jax CUDA plugin built for the CUDA your driver supports")
    if driver_cuda < runtime:
        return Check("cuda", WARN, detail,
                     f"runs through CUDA minor-version compatibility; if kernels fail to load "
                     f"(PTX errors), upgrade the driver to one supporting CUDA {_cuda(runtime)}")
    return Check("cuda", OK, detail)


def check_memory() -> Check:
    """Free memory of device 0 (accelerators) or of the host (CPU)."""
    import jax

    device = jax.devices()[0]
    stats = device.memory_stats() if device.platform != "cpu" else None
    if stats and "bytes_limit" in stats:
        free = stats["bytes_limit"] - stats.get("bytes_in_use", 0)
        where = f"{device.device_kind} {device.id}"
    else:
        free = host_available_bytes()
        where = "host (CPU backend)"
    detail = f"{free / GIB:.1f} GiB free on {where}"
    if free is None:
        return Check("memory", WARN, f"could not read free memory of {where}")
    if free < LOW_MEMORY_BYTES:
        return Check("memory", WARN, detail, "close other programs using the device, or use "
                     "a smaller model / --dtype=bfloat16 / a mesh over more devices")
    return Check("memory", OK, detail)


def host_available_bytes() -> int | None:
    """MemAvailable from /proc/meminfo (Linux), else None."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def compilation_cache_dir() -> Path:
    """Where generate() keeps XLA's persistent compilation cache (see enable_compilation_cache)."""
    import jax

    if jax.config.jax_compilation_cache_dir:
        return Path(jax.config.jax_compilation_cache_dir)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "jaxinfer" / "xla"


def check_compilation_cache(path: Path | None = None) -> Check:
    """The persistent compilation cache directory must be creatable and writable."""
    path = path or compilation_cache_dir()
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".doctor-"):
            pass
    except OSError as e:
        return Check("compilation cache", FAIL, f"{path} is not writable ({e.strerror})",
                     "point XDG_CACHE_HOME (or jax's jax_compilation_cache_dir) at a writable "
                     "directory; without it every start compiles from scratch")
    return Check("compilation cache", OK, f"{path} is writable")


CHECKS: tuple[Callable[[], Check], ...] = (
    check_versions, check_devices, check_cuda, check_memory, check_compilation_cache)


def run_checks(checks=CHECKS) -> list[Check]:
    """Every check's result; a check that crashes is reported as failed, not raised."""
    results = []
    for check in checks:
        try:
            results.append(check())
        except Exception as e:
            name = check.__name__.removeprefix("check_").replace("_", " ")
            results.append(Check(name, FAIL, f"the check itself failed: {type(e).__name__}: "
                                 f"{e}", "report this with the output above"))
    return results


def report(results: list[Check]) -> str:
    """One line per check, with its remedy indented below it."""
    lines = []
    for r in results:
        lines.append(f"[{r.status.upper():4}] {r.name}: {r.detail}")
        if r.remedy:
            lines.append(f"       -> {r.remedy}")
    return "\n".join(lines)
