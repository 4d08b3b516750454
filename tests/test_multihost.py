"""Two processes on localhost (jax.distributed, gloo CPU collectives, 4 fake devices each)
run one generation sharded over all 8 devices and produce the single-process tokens."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

import jaxinfer

MESH = "model:8"  # tensor parallel across the two processes: every layer talks over gloo
PROMPTS = ("The capital of France is", "def fib(n):")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def prompts(smollm2):
    return [smollm2.tokenizer.encode(p) for p in PROMPTS]


@pytest.fixture(scope="module")
def results(smollm2_path, prompts):
    worker = Path(__file__).with_name("multihost_worker.py")
    port = str(free_port())
    env = {**os.environ, "XLA_FLAGS": ""}  # the worker sets its own device count
    procs = [subprocess.Popen(
        [sys.executable, str(worker), port, str(i), MESH, str(smollm2_path), json.dumps(prompts)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for i in range(2)]
    outputs = []
    for proc in procs:
        try:
            out, err = proc.communicate(timeout=600)
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            raise
        assert proc.returncode == 0, err[-3000:]
        outputs.append(json.loads(next(
            line for line in out.splitlines() if line.startswith("RESULT ")).removeprefix(
                "RESULT ")))
    return outputs


def test_two_processes_of_four_devices_form_one_eight_device_job(results):
    assert [(r["process"], r["processes"], r["local_devices"], r["devices"]) for r in results] \
        == [(0, 2, 4, 8), (1, 2, 4, 8)]


def test_every_process_gets_the_single_process_tokens(results, smollm2, prompts):
    reference = jaxinfer.generate(smollm2.params, prompts, smollm2.config, max_new_tokens=8)
    for r in results:
        assert r["tokens"] == reference.tokens
