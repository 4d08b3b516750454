"""Mixture-of-experts families from Hugging Face checkpoints: tiny random transformers models
(Mixtral, Qwen3-MoE), saved with save_pretrained, load in jaxinfer with the same logits, the
same 32 greedy tokens and the same experts chosen by every router; bad checkpoints (a missing
expert, the wrong expert count) fail with errors naming the tensor."""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import jaxinfer
from jaxinfer.cache import KVCache
from jaxinfer.checkpoints import safetensors as hf
from jaxinfer.checkpoints.model import CheckpointError
from jaxinfer.models import family, moe
from tests.numerics import assert_top1_agrees_where_decisive

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

VOCAB = 320
N_EXPERTS, TOP_K = 8, 2
SHAPE = dict(vocab_size=VOCAB, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
             num_hidden_layers=2, max_position_embeddings=256, num_experts_per_tok=TOP_K)
# The bar: fp32 logits within 1e-4 of their spread (measured: below 1e-6).
RELATIVE_TOLERANCE = 1e-4
GREEDY_TOKENS = 32
WINDOW = 8  # gpt-oss's sliding layers: shorter than the prompts


def _configs() -> dict:
    T = transformers
    return {
        "mixtral": (T.MixtralConfig(**SHAPE, intermediate_size=48, num_local_experts=N_EXPERTS),
                    T.MixtralForCausalLM),
        # Qwen3-MoE's default: the chosen experts' softmax weights are not renormalised.
        "qwen3_moe": (T.Qwen3MoeConfig(**SHAPE, intermediate_size=96, moe_intermediate_size=32,
                                       num_experts=N_EXPERTS, head_dim=32, norm_topk_prob=False),
                      T.Qwen3MoeForCausalLM),
        # Attention sinks, q/k/v/o biases, alternating sliding window, YaRN rope; router and
        # expert biases, the clamped SwiGLU, gate and up interleaved in one tensor.
        "gpt_oss": (T.GptOssConfig(
            **SHAPE, intermediate_size=32, num_local_experts=N_EXPERTS, head_dim=16,
            sliding_window=WINDOW, layer_types=["sliding_attention", "full_attention"],
            rope_parameters={"rope_type": "yarn", "rope_theta": 150_000.0, "factor": 4.0,
                             "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False,
                             "original_max_position_embeddings": 64}),
            T.GptOssForCausalLM),
    }


FAMILIES = list(_configs())


@pytest.fixture(scope="module", params=FAMILIES)
def checkpoint(request, tmp_path_factory):
    """(family, directory, transformers model): a random model saved with save_pretrained."""
    name = request.param
    config, model_class = _configs()[name]
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = model_class(config).eval()
    with torch.no_grad():  # every weight random and large enough for decisive choices
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    directory = tmp_path_factory.mktemp(name)
    model.save_pretrained(directory)
    return name, directory, model


@pytest.fixture(scope="module")
def loaded(checkpoint):
    _, directory, _ = checkpoint
    cfg, params, _ = hf.load_hf(directory, progress=False)
    return cfg, params


def _prompt(seed: int, length: int = 19) -> list[int]:
    return np.random.default_rng(seed).integers(0, VOCAB, size=length).tolist()


def test_config_json_maps_to_a_mixture_of_experts(checkpoint, loaded):
    name, _, model = checkpoint
    cfg, params = loaded
    assert cfg.architecture == name
    assert (cfg.n_experts, cfg.experts_per_token) == (N_EXPERTS, TOP_K)
    assert cfg.router_renormalize == (name != "qwen3_moe")
    if name == "gpt_oss":
        assert cfg.attn_sinks and cfg.o_bias and cfg.qkv_bias and cfg.expert_bias
        assert cfg.layer_windows() == (WINDOW, None) and cfg.swiglu_limit == 7.0
        assert cfg.rope_attention_factor == pytest.approx(0.1 * np.log(4.0) + 1)
        assert cfg.rope_freq_factors is not None and max(cfg.rope_freq_factors) == 4.0
    assert params["layers"]["expert_gate"].shape == (2, N_EXPERTS, 64, cfg.expert_mlp_dim)
    assert params["layers"]["expert_down"].shape == (2, N_EXPERTS, cfg.expert_mlp_dim, 64)


@pytest.mark.numerics
def test_logits_match_transformers(loaded, checkpoint):
    _, _, model = checkpoint
    cfg, params = loaded
    ids = _prompt(0)
    ours, _ = family(cfg.architecture).forward(
        params, jnp.array([ids]), jnp.arange(len(ids))[None], KVCache.init(cfg, 1, len(ids)), cfg)
    with torch.no_grad():
        theirs = model(torch.tensor([ids])).logits.numpy()
    spread = float(theirs.max() - theirs.min())
    print(f"max |diff| / spread {np.abs(np.asarray(ours) - theirs).max() / spread:.1e}")
    np.testing.assert_allclose(np.asarray(ours), theirs, rtol=0, atol=RELATIVE_TOLERANCE * spread)


@pytest.mark.numerics
def test_greedy_tokens_match_transformers(loaded, checkpoint):
    """Our 32 greedy tokens, fed back to transformers in one forward: each is its argmax after
    the same prefix wherever that argmax is decisive (top-2 margin over twice the tolerance)."""
    _, _, model = checkpoint
    cfg, params = loaded
    ids = _prompt(1)
    tokens = jaxinfer.generate(params, [ids], cfg, max_new_tokens=GREEDY_TOKENS).tokens[0]
    assert len(tokens) == GREEDY_TOKENS
    with torch.no_grad():
        theirs = model(torch.tensor([ids + tokens[:-1]])).logits.numpy()[0, len(ids) - 1:]
    atol = RELATIVE_TOLERANCE * float(np.ptp(theirs))
    checked = assert_top1_agrees_where_decisive(np.array(tokens), theirs, atol)
    print(f"{checked:.0%} of {GREEDY_TOKENS} tokens decisive")
    assert checked > 0.9


@pytest.mark.numerics
def test_routers_choose_the_same_experts(loaded, checkpoint):
    """Every layer's router, given transformers' input to it: the same top-k experts wherever
    the k-th and (k+1)-th scores are apart by more than the tolerance."""
    _, _, model = checkpoint
    cfg, params = loaded
    captured = []
    routers = [m for n, m in model.named_modules() if n.endswith((".gate", ".router"))
               and hasattr(m, "top_k")]
    assert len(routers) == cfg.n_layers
    hooks = [r.register_forward_hook(lambda m, args, out: captured.append((args[0], out)))
             for r in routers]
    with torch.no_grad():
        model(torch.tensor([_prompt(2)]))
    for hook in hooks:
        hook.remove()
    for layer, (x, (logits, _, indices)) in enumerate(captured):
        bias = params["layers"]["router_bias"][layer] if cfg.router_bias else None
        weights, experts = moe.route(jnp.asarray(x.numpy()),
                                     params["layers"]["router"][layer], bias, cfg)
        probs = torch.softmax(logits, -1).sort(-1, descending=True).values.numpy()
        decisive = probs[:, TOP_K - 1] - probs[:, TOP_K] > 1e-5
        assert decisive.mean() > 0.9
        ours = np.sort(np.asarray(experts), -1)[decisive]
        np.testing.assert_array_equal(ours, np.sort(indices.numpy(), -1)[decisive])


# -- bad checkpoints ------------------------------------------------------------------------------

@pytest.fixture
def mixtral_copy(checkpoint, tmp_path):
    """A writable copy of the Mixtral directory (skipped for the other families)."""
    name, directory, _ = checkpoint
    if name != "mixtral":
        pytest.skip("the bad-checkpoint cases use the Mixtral layout")
    for path in directory.iterdir():
        (tmp_path / path.name).write_bytes(path.read_bytes())
    return tmp_path


def test_a_missing_expert_tensor_is_named(mixtral_copy):
    file = mixtral_copy / hf.SINGLE_FILE
    tensors = load_file(file)
    del tensors["model.layers.1.block_sparse_moe.experts.5.w3.weight"]
    save_file(tensors, file)
    with pytest.raises(CheckpointError, match=r"missing tensors \(8 experts per layer\).*"
                                              r"layers\.expert_up\.1\.expert5"):
        hf.load_hf(mixtral_copy, progress=False)


def test_a_config_with_fewer_experts_than_the_file_names_the_extra_tensor(mixtral_copy):
    config = json.loads((mixtral_copy / "config.json").read_text())
    config["num_local_experts"] = 6
    (mixtral_copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"tensor 'model\.layers\.0\.block_sparse_moe\."
                                              r"(experts\.6\.w\d\.weight' is expert 6|gate\."
                                              r"weight' has shape \(8, 64\))"):
        hf.load_hf(mixtral_copy, progress=False)


def test_a_config_with_more_experts_than_the_file_lists_the_missing_ones(mixtral_copy):
    config = json.loads((mixtral_copy / "config.json").read_text())
    config["num_local_experts"] = 10
    (mixtral_copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"gate\.weight' has shape \(8, 64\); config\.json "
                                              r"implies \(10, 64\).*experts=10"):
        hf.load_hf(mixtral_copy, progress=False)


def test_mxfp4_experts_fail_naming_the_tensor_and_the_way_out(checkpoint, tmp_path):
    name, directory, _ = checkpoint
    if name != "gpt_oss":
        pytest.skip("MXFP4 is gpt-oss's hub format")
    for path in directory.iterdir():
        (tmp_path / path.name).write_bytes(path.read_bytes())
    tensors = load_file(tmp_path / hf.SINGLE_FILE)
    tensors["model.layers.0.mlp.experts.gate_up_proj_blocks"] = np.zeros((8, 64, 2, 16),
                                                                         np.uint8)
    save_file(tensors, tmp_path / hf.SINGLE_FILE)
    with pytest.raises(CheckpointError, match=r"'model\.layers\.0\.mlp\.experts\.gate_up_proj_"
                                              r"blocks' holds MXFP4.*dequantize=True"):
        hf.load_hf(tmp_path, progress=False)


# -- presets for the real sizes ------------------------------------------------------------------

# name -> (the hub model's config.json, as transformers writes it, total and active parameters)
REAL_SIZES = {
    "mixtral_8x7b": (lambda: transformers.MixtralConfig(vocab_size=32000, rope_theta=1e6),
                     46.70e9, 12.88e9),
    "qwen3_30b_a3b": (lambda: transformers.Qwen3MoeConfig(
        vocab_size=151936, hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768,
        num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
        num_experts=128, num_experts_per_tok=8, norm_topk_prob=True,
        max_position_embeddings=40960), 30.53e9, 3.35e9),
    "gpt_oss_20b": (lambda: transformers.GptOssConfig(
        num_hidden_layers=24, num_local_experts=32, num_experts_per_tok=4), 20.91e9,
        3.61e9 + 201088 * 2880),  # OpenAI's 3.6B active leaves out the input embedding
}


@pytest.mark.parametrize("name", REAL_SIZES)
def test_presets_name_hub_ids_whose_configs_declare_the_published_sizes(name):
    """The preset's hub model, its config.json mapped and declared (no weights allocated):
    the published total and active parameter counts within 1%."""
    from jaxinfer.checkpoints import sources
    from jaxinfer.config import load_preset

    assert sources.HUB_ID.fullmatch(load_preset(name)["model"])
    make_config, total, active = REAL_SIZES[name]
    cfg = hf.model_config(make_config().to_dict())
    sizes = {path: int(np.prod(leaf.shape)) for path, leaf in
             _flat(family(cfg.architecture).abstract_params(cfg))}
    counted = sum(sizes.values())
    routed = sum(n for path, n in sizes.items() if "expert_" in path)
    assert abs(counted - total) / total < 0.01, f"{counted / 1e9:.2f}B parameters"
    counted_active = counted - routed + routed * cfg.experts_per_token // cfg.n_experts
    assert abs(counted_active - active) / active < 0.01, f"{counted_active / 1e9:.2f}B active"


def _flat(tree):
    import jax

    return [(jax.tree_util.keystr(p), leaf) for p, leaf in jax.tree_util.tree_flatten_with_path(
        tree)[0]]


# -- quantized experts ---------------------------------------------------------------------------

@pytest.mark.numerics
@pytest.mark.parametrize("precision", ["int8", "int4"])
def test_quantized_experts_load_and_run_through_the_quant_products(checkpoint, loaded, precision):
    """Expert weights quantized at load ([layers, experts, in, out] QArrays, quantized along
    `in`) run through the quant products: the quantized model's logits equal those of the same
    model with every weight dequantized to float (1e-4 of the spread; measured 6e-7).

    fp32 activations (cpu_kernels="f32"): the kernels' int8 activations differ from float by
    ~2% of the spread, enough to flip a near-even routing choice, so the float model is no
    reference for them.
    """
    import dataclasses

    import jax

    from jaxinfer.quant import QArray, dequantize

    _, directory, _ = checkpoint
    cfg, params = loaded
    if precision == "int4" and (cfg.expert_mlp_dim % 32 or cfg.head_dim % 32):
        pytest.skip(f"int4 groups of 32 need expert_mlp_dim={cfg.expert_mlp_dim} and "
                    f"head_dim={cfg.head_dim} to be multiples of 32")
    qcfg, qparams, _ = hf.load_hf(directory, quant=precision, progress=False)
    qcfg = dataclasses.replace(qcfg, cpu_kernels="f32")
    gate = qparams["layers"]["expert_gate"]
    assert isinstance(gate, QArray) and gate.shape == params["layers"]["expert_gate"].shape
    assert not isinstance(qparams["layers"]["router"], QArray)  # routing stays in float
    error = np.abs(np.asarray(dequantize(gate)) - np.asarray(params["layers"]["expert_gate"]))
    assert 0 < error.max() < (0.02 if precision == "int8" else 0.2)
    dequantized = jax.tree.map(lambda a: dequantize(a) if isinstance(a, QArray) else a,
                               qparams, is_leaf=lambda a: isinstance(a, QArray))
    ids = _prompt(3)
    args = (jnp.array([ids]), jnp.arange(len(ids))[None], KVCache.init(cfg, 1, len(ids)))
    want, _ = family(cfg.architecture).forward(dequantized, *args, cfg)
    got, _ = family(qcfg.architecture).forward(qparams, *args, qcfg)
    spread = float(np.ptp(np.asarray(want)))
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-4 * spread, rtol=0)


# -- GGUF -----------------------------------------------------------------------------------------

def _write_moe_gguf(path, directory, config) -> None:
    """The checkpoint as llama.cpp's converter writes it (gguf's own tensor names): Mixtral as
    "llama" with rotary-permuted q/k, Qwen3-MoE as "qwen3moe"; each layer's experts stacked
    into one [experts, out, in] tensor."""
    import gguf

    from tests.gguf_files import permute

    mixtral = config.model_type == "mixtral"
    arch = "llama" if mixtral else "qwen3moe"
    state = load_file(directory / hf.SINGLE_FILE)
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_freq_base(float(config.rope_parameters["rope_theta"]))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_expert_count(N_EXPERTS)
    writer.add_expert_used_count(TOP_K)
    if not mixtral:
        writer.add_key_length(config.head_dim)
        writer.add_value_length(config.head_dim)
        writer.add_expert_feed_forward_length(config.moe_intermediate_size)
        writer.add_expert_weights_norm(bool(config.norm_topk_prob))
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list([f"<t{i}>" for i in range(config.vocab_size)])
    writer.add_token_types([1] * config.vocab_size)
    writer.add_token_merges([])
    qk = (lambda w, heads: permute(w, heads)) if mixtral else (lambda w, heads: w)
    block, (gate, up, down) = (("block_sparse_moe", ("w1", "w3", "w2")) if mixtral else
                               ("mlp", ("gate_proj", "up_proj", "down_proj")))
    tensors = {"token_embd.weight": state["model.embed_tokens.weight"],
               "output_norm.weight": state["model.norm.weight"],
               "output.weight": state["lm_head.weight"]}
    for i in range(config.num_hidden_layers):
        p, b = f"model.layers.{i}.", f"blk.{i}."
        tensors |= {
            b + "attn_norm.weight": state[p + "input_layernorm.weight"],
            b + "attn_q.weight": qk(state[p + "self_attn.q_proj.weight"],
                                    config.num_attention_heads),
            b + "attn_k.weight": qk(state[p + "self_attn.k_proj.weight"],
                                    config.num_key_value_heads),
            b + "attn_v.weight": state[p + "self_attn.v_proj.weight"],
            b + "attn_output.weight": state[p + "self_attn.o_proj.weight"],
            b + "ffn_norm.weight": state[p + "post_attention_layernorm.weight"],
            b + "ffn_gate_inp.weight": state[p + f"{block}.gate.weight"],
        }
        for ours, theirs in (("gate", gate), ("up", up), ("down", down)):
            tensors[b + f"ffn_{ours}_exps.weight"] = np.stack(
                [state[p + f"{block}.experts.{e}.{theirs}.weight"] for e in range(N_EXPERTS)])
        if not mixtral:
            tensors[b + "attn_q_norm.weight"] = state[p + "self_attn.q_norm.weight"]
            tensors[b + "attn_k_norm.weight"] = state[p + "self_attn.k_norm.weight"]
    for name, w in tensors.items():
        writer.add_tensor(name, np.ascontiguousarray(w, np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_gguf_files_load_the_same_weights_as_the_safetensors(checkpoint, loaded, tmp_path):
    """The same model written as an F32 GGUF (gguf's tensor names, llama.cpp's layout) loads
    into the same config and bit-identical parameters as the safetensors directory, whose
    logits match transformers above."""
    from jaxinfer.checkpoints import gguf as gguf_loader

    _, directory, model = checkpoint
    cfg, params = loaded
    if cfg.architecture == "gpt_oss":
        pytest.skip("gpt-oss GGUF files are not read yet")
    path = tmp_path / "moe.gguf"
    _write_moe_gguf(path, directory, model.config)
    gcfg, gparams, _ = gguf_loader.load_gguf(path, progress=False, tokenizer_cache=None)
    fields = ("architecture", "n_experts", "experts_per_token", "expert_mlp_dim", "qk_norm",
              "router_renormalize", "n_layers", "head_dim", "tie_embeddings")
    if cfg.architecture == "qwen3_moe":  # llama.cpp renormalises unless the file says not
        assert gcfg.router_renormalize == model.config.norm_topk_prob
    assert {f: getattr(gcfg, f) for f in fields} == {f: getattr(cfg, f) for f in fields}
    flat, gflat = dict(_flat(params)), dict(_flat(gparams))
    assert flat.keys() == gflat.keys()
    for name, value in flat.items():
        np.testing.assert_array_equal(np.asarray(gflat[name]), np.asarray(value), err_msg=name)


# -- gpt-oss's MoE block ---------------------------------------------------------------------------

@pytest.mark.numerics
def test_gpt_oss_moe_block_matches_transformers():
    """gpt-oss's MLP alone (its attention sinks are not supported yet, so no whole model):
    router with a bias, softmax over the top-k logits, biased experts and the clamped SwiGLU,
    against transformers' GptOssMLP on the same weights (1e-4 of the output's spread)."""
    import dataclasses

    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssMLP

    config = transformers.GptOssConfig(hidden_size=64, intermediate_size=32,
                                       num_local_experts=N_EXPERTS, num_experts_per_tok=TOP_K)
    torch.manual_seed(0)
    block = GptOssMLP(config).eval()
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0, 0.5)  # big enough that the +-7 clamps bite
    x = torch.randn(1, 23, 64) * 3
    with torch.no_grad():
        want = block(x)[0].numpy()[0]
    state = {k: v.detach().numpy() for k, v in block.state_dict().items()}
    gate_up, gate_up_bias = state["experts.gate_up_proj"], state["experts.gate_up_proj_bias"]
    layer = {  # gate and up interleave in gpt-oss's fused [experts, in, 2 * width] tensor
        "router": state["router.weight"].T, "router_bias": state["router.bias"],
        "expert_gate": gate_up[..., ::2], "expert_up": gate_up[..., 1::2],
        "expert_down": state["experts.down_proj"],
        "expert_gate_bias": gate_up_bias[..., ::2], "expert_up_bias": gate_up_bias[..., 1::2],
        "expert_down_bias": state["experts.down_proj_bias"],
    }
    from tests.conftest import TINY

    cfg = dataclasses.replace(TINY, n_experts=N_EXPERTS, experts_per_token=TOP_K,
                              expert_mlp_dim=32, router_bias=True, expert_bias=True,
                              swiglu_limit=config.swiglu_limit)
    assert moe.SWIGLU_ALPHA == config.swiglu_alpha
    got = np.asarray(moe.moe_mlp(jnp.asarray(x.numpy()), jax_tree(layer), cfg))[0]
    gate = x.numpy()[0] @ layer["expert_gate"][0] + layer["expert_gate_bias"][0]
    assert (gate > config.swiglu_limit).any()  # the clamp was exercised
    np.testing.assert_allclose(got, want, atol=1e-4 * float(np.ptp(want)), rtol=0)


def jax_tree(layer: dict) -> dict:
    return {k: jnp.asarray(v) for k, v in layer.items()}
