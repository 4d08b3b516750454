"""The offline benchmark launcher on tiny settings: its JSON report and its flag errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

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
