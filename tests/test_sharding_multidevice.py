"""SmolLM2 on meshes of 8 fake CPU devices against one device; Orbax restore onto a mesh;
peak host memory of loading.

jax fixes the device count when it starts, so one fresh process (tests/multidevice_worker.py,
with --xla_force_host_platform_device_count=8) runs every mesh once and reports facts; the
tests below check them. Logit tolerance: 1e-3 absolute (fp32; sharded matmuls sum partial
products in another order, measured differences are ~2e-4 on logits of magnitude ~20).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

MESHES = ("data:1,model:8", "data:2,model:4", "data:8,model:1")
LOGIT_ATOL = 1e-3

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
SPLIT_DIM = {  # which dimension the model axis splits (the rest are replicated)
    "embed": 0, "layers.w_gate": 2, "layers.w_up": 2, "layers.w_down": 1,
    "layers.wq": 3, "layers.wk": 3, "layers.wv": 3, "layers.wo": 2,
}


def expected_shard_shapes(model: int) -> dict:
    shapes = {name: list(shape) for name, shape in FULL.items()}
    for name, dim in SPLIT_DIM.items():
        shapes[name][dim] //= model
    return shapes


@pytest.fixture(scope="module")
def facts(smollm2_path, tmp_path_factory):
    """Runs the worker once (about a minute) and parses its JSON report."""
    work = tmp_path_factory.mktemp("multidevice")
    worker = Path(__file__).with_name("multidevice_worker.py")
    env = {**os.environ, "XLA_FLAGS": ""}  # the worker sets its own flags before jax starts
    run = subprocess.run([sys.executable, str(worker), str(smollm2_path), str(work)],
                         capture_output=True, text=True, timeout=900, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    line = next(x for x in run.stdout.splitlines() if x.startswith("FACTS "))
    return json.loads(line.removeprefix("FACTS "))


def test_worker_sees_eight_devices(facts):
    assert facts["devices"] == 8


@pytest.mark.parametrize("mesh", MESHES)
def test_greedy_tokens_identical_to_one_device(facts, mesh):
    assert facts["meshes"][mesh]["tokens"] == facts["reference_tokens"]


@pytest.mark.parametrize("mesh", MESHES)
def test_logits_close_to_one_device(facts, mesh):
    assert facts["meshes"][mesh]["max_logit_diff"] <= LOGIT_ATOL


@pytest.mark.parametrize("mesh", MESHES)
def test_each_weight_is_split_as_the_rules_say(facts, mesh):
    model = int(mesh.split("model:")[1])
    assert facts["meshes"][mesh]["shard_shapes"] == expected_shard_shapes(model)


@pytest.mark.parametrize("mesh, shape", [
    ("data:1,model:8", [30, 2, 3, 8, 8]),  # head_dim 64 / 8
    ("data:2,model:4", [30, 1, 3, 8, 16]),  # batch 2 / 2, head_dim 64 / 4
    ("data:8,model:1", [30, 2, 3, 8, 64]),  # batch 2 cannot split 8 ways: stays whole
])
def test_kv_cache_is_split_along_head_dim_and_batch(facts, mesh, shape):
    # [layers, batch, kv_heads, max_len, head_dim] per device, for batch 2 and 8 positions
    assert facts["meshes"][mesh]["cache_shard_shape"] == shape


def test_orbax_checkpoint_restores_onto_another_mesh_with_the_same_logits(facts):
    orbax = facts["orbax"]
    assert orbax["shard_shapes"] == expected_shard_shapes(model=4)  # saved from one device
    assert orbax["max_logit_diff"] <= LOGIT_ATOL
    assert orbax["config_equal"]


def test_orbax_checkpoint_keeps_the_tokenizer(facts):
    assert facts["orbax"]["encode_equal"] and facts["orbax"]["stop_ids_equal"]


def test_gguf_loading_peak_memory_under_one_and_a_half_times_the_params(facts):
    ratio = facts["load_peak_rss_bytes"] / facts["param_bytes"]
    print(f"peak RSS while loading: {facts['load_peak_rss_bytes'] / 2**20:.0f} MiB for "
          f"{facts['param_bytes'] / 2**20:.0f} MiB of params ({ratio:.2f}x)")
    assert ratio < 1.5
