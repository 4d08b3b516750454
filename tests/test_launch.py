"""The launch script, run as a user runs it (the README's first command)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def launch(*flags: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "jaxinfer.launch.generate", *flags],
        capture_output=True, text=True, timeout=600,
    )


def test_default_command_answers_the_default_question(smollm2_path):
    run = launch()
    assert run.returncode == 0, run.stderr
    assert "Paris" in run.stdout
    assert "compile" in run.stderr and "tok/s" in run.stderr


def test_plain_prompt_with_sampling_flags(smollm2_path):
    run = launch("--nochat", "--prompt=1, 2, 3, 4,", "--max_new_tokens=8", "--temperature=0.7",
                 "--top_p=0.9", "--top_k=40", "--seed=3")
    assert run.returncode == 0, run.stderr
    assert "[8 tokens, finish: length]" in run.stderr


def test_speculative_decoding_flags_report_the_accepted_drafts(smollm2_path):
    run = launch("--nochat", "--prompt=a b c d a b c d a b c d", "--max_new_tokens=12",
                 "--speculative_method=ngram", "--num_speculative_tokens=4")
    assert run.returncode == 0, run.stderr
    assert "[speculative ngram:" in run.stderr and "drafted tokens accepted]" in run.stderr


def test_preset_may_set_the_weight_format(smollm2_path, tmp_path):
    preset = tmp_path / "gguf.toml"
    default = Path(__file__).parent.parent / "configs" / "smollm2_135m.toml"
    preset.write_text(default.read_text() + 'quant = "gguf"\n')
    run = launch(f"--preset={preset}", "--nochat", "--prompt=1, 2, 3,", "--max_new_tokens=2")
    assert run.returncode == 0, run.stderr
    assert "gguf weights" in run.stderr


def test_compiling_while_the_weights_load_gives_the_same_answer(smollm2_path):
    beside = launch("--compile_while_loading=true")
    after = launch("--compile_while_loading=false")
    assert beside.returncode == 0 and after.returncode == 0, beside.stderr + after.stderr
    assert beside.stdout == after.stdout and "Paris" in beside.stdout
    assert "beside it" in beside.stderr and "beside it" not in after.stderr


def test_unknown_model_exits_with_the_known_names():
    run = launch("--model=llama-9000")
    assert run.returncode == 1
    assert "unknown model 'llama-9000'" in run.stderr and "smollm2-135m-instruct" in run.stderr


def test_out_of_range_flag_is_a_clear_error(smollm2_path):
    run = launch("--top_p=1.5")
    assert run.returncode == 1
    assert "top_p=1.5 must be in (0, 1]" in run.stderr
