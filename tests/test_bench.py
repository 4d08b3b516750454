"""The offline benchmark launcher on tiny settings: its JSON report and its flag errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from jaxinfer.bench import machine
from jaxinfer.bench.workload import Workload

BENCH = [sys.executable, "-m", "jaxinfer.launch.bench"]


def run_bench(*flags: str) -> subprocess.CompletedProcess:
    return subprocess.run([*BENCH, *flags], capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def report(smollm2_path) -> dict:
    """One fp32 run: a 16-token bucket throughout, so only two programs compile."""
    done = run_bench(f"--model={smollm2_path}", "--prompt=Hello", "--batch_sizes=1",
                     "--decode_tokens=4", "--prefill_tokens=16", "--repeats=1",
                     "--bandwidth_mib=16", "--json")
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_report_holds_every_figure_for_the_engine(report):
    (result,) = report["results"]
    assert (result["engine"], result["quant"], result["dtype"]) == ("jaxinfer", None, "float32")
    for key in ("load_s", "compile_s", "ttft_cold_s", "ttft_s"):
        assert result[key] > 0, key
    assert result["ttft_cold_s"] >= result["compile_s"]  # the first request compiles
    assert list(result["prefill_tok_s"]) == ["16"] and result["prefill_tok_s"]["16"] > 0
    assert list(result["decode_tok_s"]) == ["1"] and result["decode_tok_s"]["1"] > 0
    assert result["peak_rss_bytes"] > result["param_bytes"]
    assert report["settings"]["prompt_tokens"] == 1 and report["ratios"] == {}


def test_report_names_the_cpu_its_flags_and_a_timed_kernel_build(report):
    from jaxinfer.kernels.cpu import build

    cpu = report["machine"]["cpu"]
    assert cpu["model"] and set(cpu["isa_flags"]) <= set(machine.ISA_FLAGS)
    assert cpu["kernel_isas"] == build.available_isas()
    if build.compiler() is not None:
        assert 0 < cpu["kernel_build_s"] < 300


def test_param_bytes_are_the_gguf_tensors_in_fp32(report, smollm2_path):
    from jaxinfer.checkpoints import gguf

    reader = gguf.open_gguf(smollm2_path)
    assert report["results"][0]["param_bytes"] == 4 * sum(int(t.n_elements)
                                                          for t in reader.tensors)


def test_bandwidth_fraction_is_param_bytes_times_steps_over_machine_bandwidth(report):
    result, bandwidth = report["results"][0], report["machine"]["bandwidth"]
    assert bandwidth["method"] in bandwidth["all_gbps"]
    assert bandwidth["gbps"] == max(bandwidth["all_gbps"].values()) > 0
    expected = result["param_bytes"] * result["decode_tok_s"]["1"] / 1e9 / bandwidth["gbps"]
    assert result["bandwidth_fraction"]["1"] == pytest.approx(expected, rel=1e-9)


def test_bad_flag_exits_with_a_usage_error_naming_what_is_allowed():
    done = run_bench("--quant=none,int3")
    assert done.returncode != 0
    assert "--quant: unknown 'int3'; allowed: none, int8, int4, gguf" in done.stderr


def test_bad_peer_and_list_entries_are_errors_naming_what_is_allowed(smollm2_path):
    from jaxinfer.bench import options

    with pytest.raises(ValueError, match="unknown 'vllm'; allowed: llama_cpp, transformers"):
        options.peers(["vllm"], smollm2_path)
    with pytest.raises(ValueError, match="--batch_sizes=1,0: .* each at least 1"):
        options.positive_ints("batch_sizes", ["1", "0"])
    with pytest.raises(ValueError, match="--prefill_tokens=1k: expected positive integers"):
        options.positive_ints("prefill_tokens", ["1k"])
    with pytest.raises(ValueError, match="unknown dtype 'fp8'; allowed: float32, bfloat16, auto"):
        options.configs(["none:fp8"], ["float32"])


def test_quant_entries_take_every_dtype_unless_they_name_their_own():
    from jaxinfer.bench import options

    got = options.configs(["none", "gguf:bfloat16"], ["float32", "bfloat16"])
    assert [(c["quant"], c["dtype"]) for c in got] == [
        (None, "float32"), (None, "bfloat16"), ("gguf", "bfloat16")]


def test_prefill_longer_than_the_context_is_an_error(smollm2_path):
    from jaxinfer.bench import options

    with pytest.raises(ValueError, match="--prefill_tokens: 9,000 tokens .* context of 8,192"):
        options.workload(smollm2_path, "Hello", ["9000"], ["1"], 4, 1, 1)


def tiny_workload() -> Workload:
    return Workload(model="none.gguf", prompt_ids=(1,), prefill_tokens=(4,), batch_sizes=(1,),
                    decode_tokens=2, vocab_size=10, threads=1, repeats=1)


def test_a_peer_killed_by_a_signal_is_reported_with_signal_step_and_last_stderr_lines(
        tmp_path, monkeypatch):
    from jaxinfer.bench import report, worker

    fake_python = tmp_path / "python"  # stands in for the worker: logs a step, then SIGILL
    fake_python.write_text("#!/bin/sh\n"
                           "echo '[12:00:00] llama.cpp: decode batch 8' >&2\n"
                           "echo 'ggml_vec_dot_q4_1_q8_1: using AMX tiles' >&2\n"
                           "kill -ILL $$\n")
    fake_python.chmod(0o755)
    monkeypatch.setattr(sys, "executable", str(fake_python))
    result = worker.run({"engine": "llama_cpp"}, tiny_workload())
    assert result["error"] == ("killed by SIGILL (signal 4) at [12:00:00] llama.cpp: decode "
                               "batch 8; last stderr line: ggml_vec_dot_q4_1_q8_1: using AMX "
                               "tiles")
    assert result["stderr_tail"] == ["[12:00:00] llama.cpp: decode batch 8",
                                     "ggml_vec_dot_q4_1_q8_1: using AMX tiles"]
    text = report.table({
        "results": [result], "ratios": {},
        "settings": {"prefill_tokens": [4], "batch_sizes": [1], "prompt_tokens": 1,
                     "threads": 1, "peer_omp_wait_policy": "passive", "repeats": 1,
                     "decode_tokens": 2},
        "machine": {"bandwidth": {"gbps": 1.0, "method": "jax sum", "all_gbps": {}},
                    "cpus": 2, "load_avg_before": 0.0, "load_avg_after": 0.0}})
    assert "llama.cpp failed: killed by SIGILL (signal 4)" in text
    assert "    ggml_vec_dot_q4_1_q8_1: using AMX tiles" in text


def test_a_worker_that_exits_with_an_error_is_reported_with_its_exit_status_and_exception():
    from jaxinfer.bench import worker

    result = worker.run({"engine": "vllm"}, tiny_workload())
    assert result["error"].startswith("exit status 1; last stderr line: ValueError: unknown "
                                      "engine 'vllm'"), result["error"]


def test_llama_cpp_build_enables_exactly_the_listed_isas_and_never_amx():
    from jaxinfer.bench import llama_cpp_build

    flags = llama_cpp_build.cpu_flags(
        "processor\t: 0\nflags\t\t: sse4_2 avx avx2 fma f16c bmi2 avx512f avx512cd avx512vl "
        "avx512dq avx512_vnni amx_tile amx_int8\n")
    args = llama_cpp_build.cmake_args(flags).split()
    assert "-DGGML_NATIVE=OFF" in args and "-DGGML_AVX2=ON" in args
    assert "-DGGML_AVX512=OFF" in args  # avx512bw is missing, and GGML_AVX512 compiles for it
    assert "-DGGML_AVX512_VNNI=ON" in args and "-DGGML_AVX_VNNI=OFF" in args
    assert {"-DGGML_AMX_TILE=OFF", "-DGGML_AMX_INT8=OFF", "-DGGML_AMX_BF16=OFF"} <= set(args)
    assert not any(a.startswith("-DGGML_AMX") and a.endswith("=ON") for a in args)
