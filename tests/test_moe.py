"""The mixture-of-experts MLP: the grouped product against a dense per-expert reference
(empty experts, every token on one expert), the router and the whole block against numpy,
the serving engine, Orbax and the bench on a tiny random MoE model."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxinfer
from jaxinfer.models import llama, moe
from jaxinfer.quant import dequantize, quantize

IMPLS = ("tiles", "ragged")
# fp32 products of the same rows in another blocking: rounding only (measured <= 2e-6).
ATOL = 1e-5


@pytest.fixture(scope="module")
def moe_cfg(tiny_cfg):
    return dataclasses.replace(tiny_cfg, n_experts=8, experts_per_token=2, expert_mlp_dim=32)


def _dense_grouped(x, w, group_sizes):
    """Row r times the weight of its group, one expert at a time (numpy)."""
    out = np.zeros((x.shape[0], w.shape[-1]), np.float32)
    start = 0
    for g, size in enumerate(group_sizes):
        out[start:start + size] = x[start:start + size] @ w[g]
        start += size
    return out


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("group_sizes", [
    [3, 0, 5, 0, 0, 2, 6, 0],  # empty experts among full ones
    [16, 0, 0, 0, 0, 0, 0, 0],  # every row on the first expert
    [0, 0, 0, 0, 0, 0, 0, 16],  # every row on the last expert
    [1, 1, 1, 1, 1, 1, 1, 9],
    [2, 0, 3, 0, 0, 0, 0, 0],  # rows past the groups' total come out zero
])
def test_grouped_matmul_matches_a_dense_per_expert_product(impl, group_sizes, rng):
    x = rng.standard_normal((16, 24)).astype(np.float32)
    w = rng.standard_normal((8, 24, 40)).astype(np.float32)
    got = moe.grouped_matmul(jnp.asarray(x), jnp.asarray(w), jnp.asarray(group_sizes, jnp.int32),
                             impl)
    np.testing.assert_allclose(np.asarray(got), _dense_grouped(x, w, group_sizes), atol=ATOL,
                               rtol=0)


def test_grouped_matmul_takes_quantized_experts(rng):
    """int8 / int4 QArrays [experts, in, out], quantized along `in`, through quant.einsum."""
    x = rng.standard_normal((12, 64)).astype(np.float32)
    w = rng.standard_normal((4, 64, 48)).astype(np.float32)
    sizes = [5, 0, 7, 0]
    for precision in ("int8", "int4"):
        q = quantize(jnp.asarray(w), precision, axis=-2)
        got = np.asarray(moe.grouped_matmul(jnp.asarray(x), q, jnp.asarray(sizes, jnp.int32)))
        want = _dense_grouped(x, np.asarray(dequantize(q)), sizes)
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
        assert np.abs(want - _dense_grouped(x, w, sizes)).max() > 1e-3  # really quantized


def _numpy_moe(x, router, w_gate, w_up, w_down, k, renormalize=True, scores="softmax"):
    logits = x @ router
    if scores == "softmax":
        s = np.exp(logits - logits.max(-1, keepdims=True))
        s = s / s.sum(-1, keepdims=True)
    else:
        s = 1 / (1 + np.exp(-logits))
    out = np.zeros_like(x)
    chosen = np.argsort(-s, axis=-1)[:, :k]
    for t in range(x.shape[0]):
        weights = s[t, chosen[t]]
        if renormalize:
            weights = weights / weights.sum()
        for e, weight in zip(chosen[t], weights, strict=True):
            gate = x[t] @ w_gate[e]
            out[t] += weight * ((gate / (1 + np.exp(-gate)) * (x[t] @ w_up[e])) @ w_down[e])
    return out, chosen


@pytest.mark.parametrize("scores, renormalize", [("softmax", True), ("softmax", False),
                                                 ("sigmoid", False)])
def test_moe_block_matches_numpy(moe_cfg, scores, renormalize, rng):
    cfg = dataclasses.replace(moe_cfg, router_scores=scores, router_renormalize=renormalize,
                              shared_expert_dim=16)
    layer = jax.tree.map(lambda a: a[0], llama.init_params(cfg, jax.random.key(1))["layers"])
    layer = {k: v * 4 if k == "router" else v for k, v in layer.items()}  # decisive routing
    x = rng.standard_normal((2, 5, cfg.embed_dim)).astype(np.float32)
    got = np.asarray(moe.moe_mlp(jnp.asarray(x), layer, cfg))
    np_layer = {k: np.asarray(v) for k, v in layer.items()}
    flat = x.reshape(-1, cfg.embed_dim)
    want, chosen = _numpy_moe(flat, np_layer["router"], np_layer["expert_gate"],
                              np_layer["expert_up"], np_layer["expert_down"],
                              cfg.experts_per_token, renormalize, scores)
    gate = flat @ np_layer["shared_gate"]
    want += (gate / (1 + np.exp(-gate)) * (flat @ np_layer["shared_up"])) @ np_layer["shared_down"]
    _, experts = moe.route(jnp.asarray(flat), layer["router"], None, cfg)
    assert (np.sort(np.asarray(experts), -1) == np.sort(chosen, -1)).all()
    np.testing.assert_allclose(got.reshape(-1, cfg.embed_dim), want, atol=1e-4, rtol=0)


def test_router_bias_and_scale_are_config_data(moe_cfg, rng):
    cfg = dataclasses.replace(moe_cfg, router_bias=True, routed_scale=2.5,
                              router_renormalize=True)
    x = jnp.asarray(rng.standard_normal((3, cfg.embed_dim)).astype(np.float32))
    router = jnp.zeros((cfg.embed_dim, cfg.n_experts))
    bias = jnp.arange(cfg.n_experts, dtype=jnp.float32)  # the bias alone decides: 7 and 6
    weights, experts = moe.route(x, router, bias, cfg)
    assert np.asarray(experts).tolist() == [[7, 6]] * 3
    np.testing.assert_allclose(np.asarray(weights).sum(-1), 2.5, rtol=1e-6)


def test_moe_config_rejects_top_k_above_the_expert_count(moe_cfg):
    with pytest.raises(ValueError, match=r"experts_per_token=9.*n_experts=8"):
        dataclasses.replace(moe_cfg, experts_per_token=9)


def test_mesh_specs_take_an_expert_axis_between_data_and_model():
    from jaxinfer.sharding import parse_mesh_spec

    assert parse_mesh_spec("expert:2,model:4", 8) == {"data": 1, "expert": 2, "model": 4}
    assert list(parse_mesh_spec("model:2,expert:4", 8)) == ["data", "expert", "model"]
    assert "expert" not in parse_mesh_spec("data:2,model:4", 8)  # dense meshes as before
    with pytest.raises(ValueError, match=r"allowed axes: data, model, expert"):
        parse_mesh_spec("experts:8", 8)


@pytest.mark.numerics
def test_the_serving_engine_runs_a_moe_model_as_generate_does(moe_cfg, smollm2_path):
    """The scheduler and paged engine, unchanged, on a tiny random MoE model with gpt-oss's
    quirks (attention sinks over the pages too): four concurrent requests get generate()'s
    greedy tokens (reference paths checked free of near-ties)."""
    from jaxinfer.checkpoints import gguf_vocab
    from jaxinfer.serving import EngineConfig
    from jaxinfer.serving.engine import Engine
    from jaxinfer.serving.scheduler import Scheduler
    from tests.test_serving_engine import reference, submit_all

    cfg = dataclasses.replace(moe_cfg, attn_sinks=True, o_bias=True, qkv_bias=True,
                              router_bias=True, expert_bias=True, swiglu_limit=7.0,
                              sliding_window=8, layer_types=("sliding_attention",
                                                             "full_attention"))
    params = jax.tree_util.tree_map_with_path(  # 8x the init scale: varied continuations
        lambda path, x: x if "norm" in jax.tree_util.keystr(path) else x * 8,
        llama.init_params(cfg, jax.random.key(3)))
    params["layers"]["sinks"] = params["layers"]["sinks"] * 20  # sinks that take real weight
    model = jaxinfer.Model(cfg, params, gguf_vocab.build(smollm2_path))
    config = EngineConfig(max_batch_size=4, max_seq_len=64, page_size=8, num_pages=40,
                          decode_steps=3, max_queue_size=8)
    prompts = [[5, 17, 99, 3, 250, 42, 7, 8], [3, 1, 4, 1, 5, 9, 2, 6, 5, 3], [77, 78],
               [10, 20, 30, 40, 50]]
    scheduler = Scheduler(Engine(model, config))
    scheduler.start()
    try:
        sinks = submit_all(scheduler, prompts, 12)
    finally:
        scheduler.stop(10)
    for prompt, sink in zip(prompts, sinks, strict=True):
        assert sink.tokens == reference(model, prompt, 12)


def test_orbax_round_trips_a_moe_model_float_and_quantized(moe_cfg, tmp_path):
    """The Orbax checkpoint format, unchanged, holds MoE parameters: float and int8 experts
    come back bit-identical, with the MoE config fields."""
    from jaxinfer.checkpoints import orbax
    from jaxinfer.quant import QArray, quantize_params

    params = llama.init_params(moe_cfg, jax.random.key(4))
    quantized = quantize_params(params, "int8")
    assert isinstance(quantized["layers"]["expert_down"], QArray)
    for name, cfg, tree in (("float", moe_cfg, params),
                            ("int8", dataclasses.replace(moe_cfg, quant="int8"), quantized)):
        orbax.save(tmp_path / name, cfg, tree)
        restored = orbax.load(tmp_path / name)
        assert restored.config == cfg
        for got, want in zip(jax.tree.leaves(restored.params), jax.tree.leaves(tree),
                             strict=True):
            np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_the_bench_counts_a_mixtures_active_parameter_bytes(moe_cfg, tiny_params):
    from jaxinfer.bench.report import add_bandwidth
    from jaxinfer.quant import active_param_bytes, param_bytes

    params = llama.init_params(moe_cfg, jax.random.key(5))
    L, E, D, F = (moe_cfg.n_layers, moe_cfg.n_experts, moe_cfg.embed_dim,
                  moe_cfg.expert_mlp_dim)
    unused = (E - moe_cfg.experts_per_token) * 3 * D * F * 4 * L  # fp32 experts not chosen
    active = active_param_bytes(params, moe_cfg.experts_per_token, E)
    assert active == param_bytes(params) - unused
    assert active_param_bytes(tiny_params) == param_bytes(tiny_params)  # dense: all of it
    result = {"param_bytes": param_bytes(params), "active_param_bytes": active,
              "decode_tok_s": {"1": 10.0}}
    add_bandwidth(result, 100.0)
    assert result["decode_weight_gbps"]["1"] == pytest.approx(active * 10 / 1e9)
