"""SmolLM2 over many devices against one device: meshes of 8 fake CPU devices, two processes
joined by jax.distributed, an Orbax checkpoint restored onto a mesh, and the peak host
memory of loading.

jax fixes the device count when it starts, so the runs happen in fresh processes, all
started at once by one fixture (they share the 2 cores while this process computes the
single-device reference):
- tests/multidevice_worker.py: 8 devices; meshes (1, 8), (2, 4), (8, 1); convert + restore.
- tests/multihost_worker.py, twice: 4 devices each, one job over localhost (gloo).
Logit tolerance: 1e-3 absolute in fp32 (sharded matmuls sum partial products in another
order; measured differences are ~2e-4 on logits of magnitude ~20). Greedy tokens are equal up
to a near-tie of the single-device run (top-2 margin <= 2e-3; measured: none, the smallest
margin along the reference paths is 0.22).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from multidevice_worker import logit_inputs, logits_of

import jaxinfer
from jaxinfer.cache import KVCache
from jaxinfer.checkpoints import gguf_vocab
from jaxinfer.models import family
from tests.numerics import assert_greedy_agrees_until_a_near_tie, top2_margin

MESHES = ("data:1,model:8", "data:2,model:4", "data:8,model:1")
MULTIHOST_MESH = "model:8"  # tensor parallel across the two processes: every layer talks
PROMPTS = ("The capital of France is", "def fib(n):")
MAX_NEW = 8
LOGIT_ATOL = 1e-3
HERE = Path(__file__).parent

# SmolLM2-135M: vocab 49152, embed 576, 30 layers, 9 heads / 3 KV heads of 64, mlp 1536.
# heads (9) and kv_heads (3) do not divide a model axis of 4 or 8: attention splits head_dim.
FULL = {
    "embed": [49152, 576], "final_norm": [576],
    "layers.attn_norm": [30, 576], "layers.mlp_norm": [30, 576],
    "layers.w_gate": [30, 576, 1536], "layers.w_up": [30, 576, 1536],
    "layers.w_down": [30, 1536, 576],
    "layers.wq": [30, 576, 9, 64], "layers.wk": [30, 576, 3, 64], "layers.wv": [30, 576, 3, 64],
    "layers.wo": [30, 9, 64, 576],
}
SPLIT_DIM = {  # the dimension the model axis splits; every other one is whole on each device
    "embed": 0, "layers.w_gate": 2, "layers.w_up": 2, "layers.w_down": 1,
    "layers.wq": 3, "layers.wk": 3, "layers.wv": 3, "layers.wo": 2,
}


def expected_shard_shapes(model: int) -> dict:
    shapes = {name: list(shape) for name, shape in FULL.items()}
    for name, dim in SPLIT_DIM.items():
        shapes[name][dim] //= model
    return shapes


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def report(proc: subprocess.Popen, tag: str) -> dict:
    try:
        out, err = proc.communicate(timeout=900)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    assert proc.returncode == 0, err[-3000:]
    line = next(x for x in out.splitlines() if x.startswith(tag + " "))
    return json.loads(line.removeprefix(tag + " "))


@pytest.fixture(scope="module")
def runs(smollm2_path, tmp_path_factory, request):
    """Starts the 8-device worker and the two-process job, computes the single-device
    reference meanwhile, and returns everything."""
    tokenizer = gguf_vocab.build(smollm2_path)
    prompts = [tokenizer.encode(p) for p in PROMPTS]
    work = tmp_path_factory.mktemp("multidevice")
    env = dict(os.environ)  # the workers add their device counts to XLA_FLAGS
    start = lambda *args: subprocess.Popen(  # noqa: E731
        [sys.executable, *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, env=env)
    port = free_port()
    procs = [start(HERE / "multidevice_worker.py", smollm2_path, work, json.dumps(prompts))] + [
        start(HERE / "multihost_worker.py", port, i, MULTIHOST_MESH, smollm2_path,
              json.dumps(prompts)) for i in range(2)]
    try:
        smollm2 = request.getfixturevalue("smollm2")
        reference = jaxinfer.generate(smollm2.params, prompts, smollm2.config,
                                      max_new_tokens=MAX_NEW).tokens
        logits, _ = logits_of(smollm2.params, logit_inputs(prompts), smollm2.config)
        chose = [teacher_forced_logits(smollm2, p, t) for p, t in zip(prompts, reference,
                                                                        strict=True)]
        facts = report(procs[0], "FACTS")
        hosts = [report(p, "RESULT") for p in procs[1:]]
    finally:
        for p in procs:
            p.kill()
    return {"reference": reference, "logits": logits, "tokenizer": tokenizer,
            "facts": facts, "hosts": hosts, "chose": chose}


def teacher_forced_logits(model, prompt: list[int], tokens: list[int]) -> np.ndarray:
    """[len(tokens), vocab]: the single-device logits that chose each of `tokens`."""
    sequence = prompt + tokens[:-1]
    logits, _ = family(model.config.architecture).forward(
        model.params, np.array([sequence]), np.arange(len(sequence))[None],
        KVCache.init(model.config, 1, len(sequence)), model.config)
    return np.asarray(logits[0, len(prompt) - 1:])


def assert_same_greedy_tokens(runs, tokens: list[list[int]]) -> None:
    smallest = min(float(top2_margin(logits).min()) for logits in runs["chose"])
    print(f"smallest top-2 margin along the reference paths: {smallest:.3g}")
    for got, want, logits in zip(tokens, runs["reference"], runs["chose"], strict=True):
        assert_greedy_agrees_until_a_near_tie(got, want, logits, LOGIT_ATOL)


def test_worker_sees_eight_devices(runs):
    assert runs["facts"]["devices"] == 8


@pytest.mark.numerics
@pytest.mark.parametrize("mesh", MESHES)
def test_greedy_tokens_identical_to_one_device(runs, mesh):
    assert_same_greedy_tokens(runs, runs["facts"]["meshes"][mesh]["tokens"])


@pytest.mark.numerics
def test_speculative_decoding_under_a_mesh_gives_the_one_device_tokens(runs):
    assert_same_greedy_tokens(runs, runs["facts"]["meshes"][MESHES[1]]["speculative_tokens"])


@pytest.mark.numerics
@pytest.mark.parametrize("mesh", MESHES)
def test_logits_close_to_one_device(runs, mesh):
    logits = np.load(runs["facts"]["meshes"][mesh]["logits"])
    np.testing.assert_allclose(logits, runs["logits"], rtol=0, atol=LOGIT_ATOL)


@pytest.mark.parametrize("mesh", MESHES)
def test_each_weight_is_split_as_the_rules_say(runs, mesh):
    model = int(mesh.split("model:")[1])
    assert runs["facts"]["meshes"][mesh]["shard_shapes"] == expected_shard_shapes(model)


@pytest.mark.parametrize("mesh, shape", [
    ("data:1,model:8", [30, 2, 3, 8, 8]),  # head_dim 64 / 8
    ("data:2,model:4", [30, 1, 3, 8, 16]),  # batch 2 / 2, head_dim 64 / 4
    ("data:8,model:1", [30, 2, 3, 8, 64]),  # batch 2 cannot split 8 ways: stays whole
])
def test_kv_cache_is_split_along_head_dim_and_batch(runs, mesh, shape):
    # [layers, batch, kv_heads, max_len, head_dim] on one device, for 2 rows of 8 positions
    assert runs["facts"]["meshes"][mesh]["cache_shard_shape"] == shape


@pytest.mark.numerics
def test_orbax_checkpoint_restores_onto_another_mesh_with_the_same_logits(runs):
    orbax = runs["facts"]["orbax"]  # converted on one device, restored onto data:2,model:4
    assert orbax["shard_shapes"] == expected_shard_shapes(model=4)
    assert orbax["config_equal"]
    np.testing.assert_allclose(np.load(orbax["logits"]), runs["logits"], rtol=0,
                               atol=LOGIT_ATOL)


def test_orbax_checkpoint_keeps_the_tokenizer(runs):
    orbax, tokenizer = runs["facts"]["orbax"], runs["tokenizer"]
    assert orbax["encode"] == tokenizer.encode("Hello, world!")
    assert orbax["stop_ids"] == list(tokenizer.stop_ids)


def test_gguf_loading_peak_memory_under_one_and_a_half_times_the_params(runs):
    # Measured 1.40-1.42x, also with another process busy on the second core (load average
    # 14): 6% under the limit. The workers here run side by side, so this is that case.
    facts = runs["facts"]
    ratio = facts["load_peak_rss_bytes"] / facts["param_bytes"]
    print(f"peak RSS while loading: {facts['load_peak_rss_bytes'] / 2**20:.0f} MiB for "
          f"{facts['param_bytes'] / 2**20:.0f} MiB of params ({ratio:.2f}x)")
    assert ratio < 1.5


def test_two_processes_of_four_devices_form_one_eight_device_job(runs):
    assert [(h["process"], h["processes"], h["local_devices"], h["devices"])
            for h in runs["hosts"]] == [(0, 2, 4, 8), (1, 2, 4, 8)]


@pytest.mark.numerics
def test_every_process_gets_the_single_process_tokens(runs):
    for host in runs["hosts"]:
        assert_same_greedy_tokens(runs, host["tokens"])
