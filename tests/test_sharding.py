"""Mesh specs, the logical-axis rules and their errors, on abstract meshes (no devices needed).

Runs with one device: the rules only need mesh axis sizes. Real 8-device runs are in
test_sharding_multidevice.py and test_multihost.py.
"""

from __future__ import annotations

import dataclasses

import jax
import pytest
from jax.sharding import AbstractMesh
from jax.sharding import PartitionSpec as P

from jaxinfer.cache import KVCache, PagedKVCache
from jaxinfer.sharding import (
    cache_specs,
    initialize_distributed,
    make_mesh,
    model_rules,
    param_specs,
    parse_mesh_spec,
)

# SmolLM2-135M's shapes (9 heads, 3 KV heads of 64) and a Llama-style 32/8-head model.
SMOLLM2 = dict(architecture="llama", vocab_size=49152, embed_dim=576, n_layers=2, n_heads=9,
               n_kv_heads=3, head_dim=64, mlp_dim=1536, max_seq_len=128)


def mesh(data: int, model: int) -> AbstractMesh:
    return AbstractMesh((data, model), ("data", "model"))


@pytest.fixture
def smollm2_cfg(tiny_cfg):
    return dataclasses.replace(tiny_cfg, **SMOLLM2)


@pytest.fixture
def llama_cfg(tiny_cfg):
    return dataclasses.replace(tiny_cfg, n_heads=32, n_kv_heads=8, head_dim=16, embed_dim=512,
                               mlp_dim=1024, vocab_size=512)


# -- mesh specs ---------------------------------------------------------------------------------

def test_mesh_spec_names_sizes_per_axis():
    assert parse_mesh_spec("data:2,model:4", 8) == {"data": 2, "model": 4}
    assert parse_mesh_spec("model:8", 8) == {"data": 1, "model": 8}
    assert parse_mesh_spec("data:2,model:-1", 8) == {"data": 2, "model": 4}


def test_default_mesh_puts_every_device_on_model():
    assert parse_mesh_spec(None, 8) == {"data": 1, "model": 8}
    assert parse_mesh_spec("", 4) == {"data": 1, "model": 4}


def test_make_mesh_on_this_machine_has_named_axes():
    built = make_mesh()
    assert built.axis_names == ("data", "model")
    assert built.devices.size == jax.device_count()


def test_unknown_mesh_axis_is_an_error_listing_the_allowed_ones():
    with pytest.raises(ValueError, match=r"unknown axis 'tensor'; allowed axes: data, model"):
        parse_mesh_spec("data:2,tensor:4", 8)


def test_mesh_size_product_must_match_the_device_count():
    with pytest.raises(ValueError, match=r"has 6 devices but this run has 8"):
        parse_mesh_spec("data:3,model:2", 8)


def test_malformed_mesh_spec_shows_an_example():
    with pytest.raises(ValueError, match=r"'model' is not axis:size \(example: data:2,model:4\)"):
        parse_mesh_spec("model", 8)
    with pytest.raises(ValueError, match=r"size 'x' of axis 'model' is not an integer"):
        parse_mesh_spec("model:x", 8)


# -- parameter rules ----------------------------------------------------------------------------

def test_heads_mlp_and_vocab_split_on_model(llama_cfg):
    specs = param_specs(llama_cfg, model_rules(llama_cfg, mesh(2, 4)))
    assert specs["embed"] == P("model")  # [vocab, embed]
    assert specs["layers"]["wq"] == P(None, None, "model")  # [layers, embed, heads, head_dim]
    assert specs["layers"]["wk"] == P(None, None, "model")  # 8 KV heads split 4 ways
    assert specs["layers"]["wo"] == P(None, "model")  # [layers, heads, head_dim, embed]
    assert specs["layers"]["w_gate"] == P(None, None, "model")  # [layers, embed, mlp]
    assert specs["layers"]["w_down"] == P(None, "model")  # [layers, mlp, embed]
    assert specs["layers"]["attn_norm"] == P()  # embed is replicated
    assert specs["final_norm"] == P()


def test_kv_heads_fewer_than_the_model_axis_split_head_dim_instead(llama_cfg):
    # 8 KV heads on 16 devices: query and KV projections and the output all split head_dim,
    # so q and k stay aligned.
    specs = param_specs(llama_cfg, model_rules(llama_cfg, mesh(1, 16)))
    for name in ("wq", "wk", "wv"):
        assert specs["layers"][name] == P(None, None, None, "model")
    assert specs["layers"]["wo"] == P(None, None, "model")


def test_smollm2_heads_indivisible_by_eight_split_head_dim(smollm2_cfg):
    specs = param_specs(smollm2_cfg, model_rules(smollm2_cfg, mesh(1, 8)))
    assert specs["layers"]["wq"] == P(None, None, None, "model")
    assert specs["layers"]["w_up"] == P(None, None, "model")


def test_all_on_data_replicates_every_weight(smollm2_cfg):
    specs = param_specs(smollm2_cfg, model_rules(smollm2_cfg, mesh(8, 1)))
    assert all(s == P() for s in jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, P)))


def test_indivisible_dimension_error_names_dimension_and_mesh_axis(smollm2_cfg):
    cfg = dataclasses.replace(smollm2_cfg, mlp_dim=1000)
    with pytest.raises(ValueError, match=r"layers.w_\w+: dimension 'mlp' has size 1000, which "
                                         r"mesh axis 'model' of size 16 cannot divide"):
        param_specs(cfg, model_rules(cfg, mesh(1, 16)))


def test_heads_and_head_dim_both_indivisible_is_an_error(smollm2_cfg):
    cfg = dataclasses.replace(smollm2_cfg, head_dim=36, embed_dim=324)
    with pytest.raises(ValueError, match=r"mesh axis 'model' of size 8 divides neither the "
                                         r"attention heads \(heads=9, kv_heads=3\) nor "
                                         r"head_dim=36"):
        model_rules(cfg, mesh(1, 8))


def test_unknown_logical_axis_is_an_error(smollm2_cfg):
    rules = model_rules(smollm2_cfg, mesh(1, 8))
    with pytest.raises(ValueError, match=r"unknown logical axis 'vision_patches'"):
        rules.spec(("vision_patches", "embed"), (8, 576), "vit.w")


# -- caches -------------------------------------------------------------------------------------

def test_dense_cache_splits_batch_on_data_and_kv_heads_on_model(llama_cfg):
    cache = jax.eval_shape(lambda: KVCache.init(llama_cfg, batch=4, max_len=32))
    specs = cache_specs(cache, model_rules(llama_cfg, mesh(2, 4)))
    # [layers, batch, kv_heads, max_len, head_dim]
    assert specs.k == specs.v == P(None, "data", "model")


def test_dense_cache_of_few_kv_heads_splits_head_dim(smollm2_cfg):
    cache = jax.eval_shape(lambda: KVCache.init(smollm2_cfg, batch=2, max_len=32))
    specs = cache_specs(cache, model_rules(smollm2_cfg, mesh(2, 4)))
    assert specs.k == P(None, "data", None, None, "model")


def test_paged_cache_splits_kv_heads_and_replicates_the_pool_index(llama_cfg):
    cache = jax.eval_shape(lambda: PagedKVCache.init(llama_cfg, num_pages=16, page_size=8,
                                                     batch=4, pages_per_seq=4))
    specs = cache_specs(cache, model_rules(llama_cfg, mesh(2, 4)))
    # k_pages: [layers, kv_heads, num_pages, page_size, head_dim]; page_table: [batch, pages]
    assert specs.k_pages == specs.v_pages == P(None, "model")
    assert specs.page_table == P("data")


# -- multi-host start-up ------------------------------------------------------------------------

def test_single_host_without_flags_or_environment_does_not_initialize(monkeypatch):
    for name in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID",
                 "SLURM_JOB_ID", "OMPI_COMM_WORLD_SIZE", "TPU_WORKER_HOSTNAMES",
                 "TPU_PROCESS_ADDRESSES"):
        monkeypatch.delenv(name, raising=False)
    assert initialize_distributed() is False


def test_coordinator_without_process_count_is_an_error(monkeypatch):
    monkeypatch.delenv("JAX_NUM_PROCESSES", raising=False)
    monkeypatch.delenv("JAX_PROCESS_ID", raising=False)
    with pytest.raises(ValueError, match=r"needs a coordinator address, process count and "
                                         r"process id.*num_processes=None"):
        initialize_distributed("10.0.0.1:1234")


def test_process_id_out_of_range_is_an_error():
    with pytest.raises(ValueError, match=r"process_id=2 must be in \[0, 2\)"):
        initialize_distributed("10.0.0.1:1234", num_processes=2, process_id=2)


def test_generate_launcher_rejects_a_mesh_that_does_not_fit_the_devices():
    import subprocess
    import sys

    run = subprocess.run([sys.executable, "-m", "jaxinfer.launch.generate", "--mesh=data:3"],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 1
    assert f"has 3 devices but this run has {jax.device_count()}" in run.stderr
