"""CMAKE_ARGS for building llama-cpp-python (the bench's CPU peer) for the instruction sets this
machine's OS enables: `CMAKE_ARGS="$(python -m jaxinfer.bench.llama_cpp_build)" pip install ...`.

Every ggml x86 option is set explicitly from /proc/cpuinfo instead of `-march=native`. Linux drops
an AVX/AVX-512 flag from cpuinfo when it does not enable that register state, so the listed flags
are safe to compile for. AMX is the exception: cpuinfo lists it, but each process must ask the
kernel for it (arch_prctl ARCH_REQ_XCOMP_PERM), and a build with AMX dies with SIGILL on machines
that refuse, so it stays off always.
"""

from __future__ import annotations

# ggml option -> the cpuinfo flags it compiles for (GGML_AVX512 adds -mavx512{f,cd,vl,dq,bw}).
GGML_X86_OPTIONS = {
    "GGML_SSE42": ("sse4_2",),
    "GGML_AVX": ("avx",),
    "GGML_AVX2": ("avx2",),
    "GGML_BMI2": ("bmi2",),
    "GGML_FMA": ("fma",),
    "GGML_F16C": ("f16c",),
    "GGML_AVX_VNNI": ("avx_vnni",),
    "GGML_AVX512": ("avx512f", "avx512cd", "avx512vl", "avx512dq", "avx512bw"),
    "GGML_AVX512_VBMI": ("avx512vbmi",),
    "GGML_AVX512_VNNI": ("avx512_vnni",),
    "GGML_AVX512_BF16": ("avx512_bf16",),
}
NEVER = ("GGML_AMX_TILE", "GGML_AMX_INT8", "GGML_AMX_BF16")


def cpu_flags(cpuinfo: str) -> set[str]:
    """The instruction-set flags of /proc/cpuinfo's first "flags" line."""
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            return set(line.partition(":")[2].split())
    return set()


def cmake_args(flags: set[str]) -> str:
    """-D options for llama.cpp's CPU backend: each ISA on exactly when cpuinfo lists it."""
    args = ["-DGGML_NATIVE=OFF", "-DLLAVA_BUILD=OFF"]  # the bench needs no multimodal library
    for option, needs in GGML_X86_OPTIONS.items():
        args.append(f"-D{option}={'ON' if flags.issuperset(needs) else 'OFF'}")
    args += [f"-D{option}=OFF" for option in NEVER]
    return " ".join(args)


def main() -> None:
    try:
        with open("/proc/cpuinfo") as f:
            flags = cpu_flags(f.read())
    except OSError:
        flags = set()
    # No cpuinfo (not Linux x86): let ggml pick for the host it builds on.
    print(cmake_args(flags) if flags else "-DGGML_NATIVE=ON -DLLAVA_BUILD=OFF")


if __name__ == "__main__":
    main()
