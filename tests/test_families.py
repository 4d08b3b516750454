"""Hugging Face checkpoints of each family: tiny random transformers models, saved with
save_pretrained, load in jaxinfer with the same logits and greedy tokens; bad directories fail
with errors that name the file and the tensor."""

from __future__ import annotations

import json
import re

import jax.numpy as jnp
import numpy as np
import pytest

import jaxinfer
from jaxinfer.cache import KVCache
from jaxinfer.checkpoints import safetensors as hf
from jaxinfer.models import family
from tests.numerics import assert_top1_agrees_where_decisive

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

VOCAB = 320
SHAPE = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256)
WINDOW = 8  # shorter than the prompts, so sliding layers see only part of them


def _configs() -> dict:
    T = transformers
    llama3_rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                   "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    return {
        # Llama 3.1-style rope scaling, untied output head.
        "llama": (T.LlamaConfig(**SHAPE, num_hidden_layers=2, rope_scaling=llama3_rope,
                                rope_theta=50_000.0, tie_word_embeddings=False),
                  T.LlamaForCausalLM),
        "mistral": (T.MistralConfig(**SHAPE, num_hidden_layers=2, sliding_window=WINDOW,
                                    head_dim=24), T.MistralForCausalLM),
        "qwen2": (T.Qwen2Config(**SHAPE, num_hidden_layers=2, tie_word_embeddings=True),
                  T.Qwen2ForCausalLM),
        "qwen3": (T.Qwen3Config(**SHAPE, num_hidden_layers=2, head_dim=16), T.Qwen3ForCausalLM),
        # Every Gemma 3 quirk at once: local/global layers with their own rope, linear rope
        # scaling on global layers, a query scale unlike head_dim, final logit soft-capping.
        "gemma3": (T.Gemma3TextConfig(
            **SHAPE, num_hidden_layers=3, head_dim=16, sliding_window=WINDOW,
            layer_types=["sliding_attention", "full_attention", "sliding_attention"],
            rope_theta=1_000_000.0, rope_local_base_freq=10_000.0,
            rope_scaling={"rope_type": "linear", "factor": 4.0}, query_pre_attn_scalar=24,
            final_logit_softcapping=5.0),
            T.Gemma3ForCausalLM),
    }


FAMILIES = list(_configs())
SHARDED = "gemma3"  # saved in several shards with an index


@pytest.fixture(scope="module", params=FAMILIES)
def checkpoint(request, tmp_path_factory):
    """(family, directory, transformers model): a random model saved with save_pretrained."""
    name = request.param
    config, model_class = _configs()[name]
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = model_class(config).eval()
    with torch.no_grad():  # every weight random and large enough for decisive argmaxes,
        for p in model.parameters():  # norms and biases included
            p.add_(torch.randn_like(p) * 0.2)
    directory = tmp_path_factory.mktemp(name)
    model.save_pretrained(directory, max_shard_size="200KB" if name == SHARDED else "50GB")
    return name, directory, model


@pytest.fixture(scope="module")
def loaded(checkpoint):
    name, directory, model = checkpoint
    cfg, params, _ = hf.load_hf(directory, progress=False)
    return cfg, params


def _prompts(n: int, lengths=(21, 13)) -> list[list[int]]:
    rng = np.random.default_rng(n)
    return [rng.integers(0, VOCAB, size=length).tolist() for length in lengths]


def test_the_sharded_checkpoint_has_an_index(checkpoint):
    name, directory, _ = checkpoint
    assert (directory / hf.INDEX_FILE).is_file() == (name == SHARDED)


def test_config_json_maps_to_the_family(checkpoint, loaded):
    name, _, model = checkpoint
    cfg, _ = loaded
    assert cfg.architecture == name
    assert cfg.n_layers == model.config.num_hidden_layers
    if name in ("mistral", "gemma3"):
        assert cfg.sliding_window == WINDOW


# fp32 on both sides: logits differ by rounding only, at most this fraction of their spread
# (measured: at most 7e-7 over the five families, natively and under --xla_cpu_max_isa=AVX);
# every greedy token measured has a top-2 margin above twice the tolerance.
RELATIVE_TOLERANCE = 2e-5


@pytest.mark.numerics
def test_logits_match_transformers(checkpoint, loaded):
    _, _, model = checkpoint
    cfg, params = loaded
    ids = _prompts(0)[0]
    ours, _ = family(cfg.architecture).forward(
        params, jnp.array([ids]), jnp.arange(len(ids))[None], KVCache.init(cfg, 1, len(ids)), cfg)
    with torch.no_grad():
        theirs = model(torch.tensor([ids])).logits.numpy()
    spread = float(theirs.max() - theirs.min())
    print(f"max |diff| / spread {np.abs(np.asarray(ours) - theirs).max() / spread:.1e}")
    np.testing.assert_allclose(np.asarray(ours), theirs, rtol=0, atol=RELATIVE_TOLERANCE * spread)
    assert_top1_agrees_where_decisive(ours, theirs, RELATIVE_TOLERANCE * spread)


@pytest.mark.numerics
def test_greedy_tokens_match_transformers(checkpoint, loaded):
    """Our 16 greedy tokens after each prompt, fed back to transformers in one forward: each is
    its argmax after the same prefix wherever that argmax is decisive (top-2 margin over twice
    the logit tolerance)."""
    _, _, model = checkpoint
    cfg, params = loaded
    prompts = _prompts(1)
    ours = jaxinfer.generate(params, prompts, cfg, max_new_tokens=16)
    for ids, tokens in zip(prompts, ours.tokens, strict=True):
        with torch.no_grad():
            theirs = model(torch.tensor([ids + tokens[:-1]])).logits.numpy()[0, len(ids) - 1:]
        atol = RELATIVE_TOLERANCE * float(np.ptp(theirs))
        checked = assert_top1_agrees_where_decisive(np.array(tokens), theirs, atol)
        print(f"{checked:.0%} of 16 tokens decisive")


# -- a directory with a tokenizer, through the public load_model --------------------------------

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
TEXTS = ["Hello world, how are you?", "<|im_start|>user\nhi<|im_end|>", "  spaces\tand\nlines 123"]


@pytest.fixture(scope="module")
def qwen2_with_tokenizer(tmp_path_factory):
    """A tiny Qwen2 directory with a byte-level BPE tokenizer, a chat template and two stops."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    backend = Tokenizer(models.BPE())
    # Qwen2's own pre-tokenizer: transformers rebuilds it for a qwen2 model_type anyway.
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    backend.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(TEXTS * 20 + ["the quick brown fox jumps over the lazy dog"] * 20,
                                trainer)
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tokenizer.chat_template = CHATML
    directory = tmp_path_factory.mktemp("qwen2-tokenizer")
    config = transformers.Qwen2Config(**SHAPE, num_hidden_layers=1,
                                      eos_token_id=backend.token_to_id("<|im_end|>"))
    torch.manual_seed(0)
    transformers.Qwen2ForCausalLM(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    generation = json.loads((directory / "generation_config.json").read_text())
    generation["eos_token_id"] = [backend.token_to_id(t) for t in ("<|im_end|>", "<|endoftext|>")]
    (directory / "generation_config.json").write_text(json.dumps(generation))
    return directory, transformers.AutoTokenizer.from_pretrained(directory)


def test_load_model_reads_a_directory_with_its_tokenizer(qwen2_with_tokenizer):
    directory, reference = qwen2_with_tokenizer
    model = jaxinfer.load_model(str(directory), dtype="float32", progress=False)
    assert model.config.architecture == "qwen2"
    for text in TEXTS:
        assert model.tokenizer.encode(text) == reference.encode(text, add_special_tokens=True)
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                {"role": "user", "content": "bye"}]
    assert model.tokenizer.apply_chat_template(messages) == reference.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True)
    # Both of generation_config.json's eos ids stop generation.
    stops = {reference.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")}
    assert stops <= set(model.tokenizer.stop_ids)


# -- bad input ----------------------------------------------------------------------------------


@pytest.fixture
def llama_dir(tmp_path):
    config, model_class = _configs()["llama"]
    torch.manual_seed(0)
    model_class(config).save_pretrained(tmp_path / "llama")
    return tmp_path / "llama"


def test_an_unsupported_architecture_is_named_with_the_supported_ones(llama_dir):
    config = json.loads((llama_dir / "config.json").read_text())
    config.update(model_type="gpt_neox", architectures=["GPTNeoXForCausalLM"])
    (llama_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"config\.json: unsupported model_type 'gpt_neox'.*"
                                         r"GPTNeoXForCausalLM.*supported: llama, mistral"):
        jaxinfer.load_model(str(llama_dir), progress=False)


def test_a_missing_shard_is_named_with_its_tensors(tmp_path):
    config, model_class = _configs()["qwen3"]
    torch.manual_seed(0)
    model_class(config).save_pretrained(tmp_path / "q", max_shard_size="200KB")
    index = json.loads((tmp_path / "q" / hf.INDEX_FILE).read_text())["weight_map"]
    shard = index["model.norm.weight"]
    first = min(name for name, file in index.items() if file == shard)
    (tmp_path / "q" / shard).unlink()
    with pytest.raises(ValueError, match=rf"{shard}: shard missing; .*{re.escape(first)}"):
        hf.load_hf(tmp_path / "q", progress=False)


def test_a_tensor_of_the_wrong_shape_is_named_with_the_expected_shape(llama_dir):
    from safetensors.numpy import load_file, save_file

    path = llama_dir / hf.SINGLE_FILE
    tensors = load_file(path)
    name = "model.layers.1.self_attn.k_proj.weight"
    tensors[name] = np.zeros((16, 64), np.float32)  # the config implies (2 * 16, 64)
    save_file(tensors, path, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=rf"model\.safetensors: tensor '{name}' has shape "
                                         r"\(16, 64\); config\.json implies \(32, 64\)"):
        hf.load_hf(llama_dir, progress=False)


def test_a_multimodal_gemma3_config_gives_its_text_model_with_transformers_defaults():
    # As multimodal Gemma 3 config.json files (transformers 4.5x) spell it: text_config lists
    # only what differs from Gemma3TextConfig's defaults.
    config = {
        "architectures": ["Gemma3ForConditionalGeneration"], "model_type": "gemma3",
        "text_config": {"model_type": "gemma3_text", "hidden_size": 64, "num_hidden_layers": 7,
                        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
                        "intermediate_size": 96, "query_pre_attn_scalar": 24,
                        "rope_scaling": {"rope_type": "linear", "factor": 8.0},
                        "sliding_window": 1024},
        "vision_config": {"model_type": "siglip_vision_model"},
    }
    cfg = hf.model_config(config)
    reference = transformers.Gemma3TextConfig(**config["text_config"])
    assert cfg.architecture == "gemma3"
    assert cfg.vocab_size == reference.vocab_size
    assert list(cfg.layer_types) == list(reference.layer_types)  # every 6th layer global
    assert cfg.rope_theta == reference.rope_parameters["full_attention"]["rope_theta"]
    assert cfg.rope_local_theta == reference.rope_parameters["sliding_attention"]["rope_theta"]
    assert cfg.rope_freq_factors == (8.0,) * 8
    assert cfg.embed_scale == 64**0.5 and cfg.query_pre_attn_scalar == 24


FAMILY_PRESETS = ["gemma3_270m", "gemma3_1b", "gemma3_27b", "llama3_8b", "llama3_2_1b",
                  "mistral_7b", "qwen2_5_0_5b", "qwen2_5_7b", "qwen3_0_6b", "qwen3_8b"]


@pytest.mark.parametrize("name", FAMILY_PRESETS)
def test_family_presets_name_a_known_model_or_a_hub_id(name):
    from jaxinfer.checkpoints import sources
    from jaxinfer.config import load_preset

    model = load_preset(name)["model"]
    assert model in sources.KNOWN_MODELS or sources.HUB_ID.fullmatch(model)


def test_bfloat16_checkpoints_load_exactly(tmp_path):
    # Hub checkpoints are mostly bf16; upcast to fp32 every value is exact.
    config, model_class = _configs()["qwen2"]
    torch.manual_seed(0)
    model = model_class(config).to(torch.bfloat16)
    model.save_pretrained(tmp_path / "bf16")
    cfg, params, _ = hf.load_hf(tmp_path / "bf16", dtype="float32", progress=False)
    expected = model.model.layers[1].self_attn.q_proj.weight.detach().float().numpy()  # [H * Dh, D]
    ours = np.asarray(params["layers"]["wq"][1])  # [D, H, Dh]
    np.testing.assert_array_equal(ours.reshape(cfg.embed_dim, -1).T, expected)
    bias = model.model.layers[0].self_attn.k_proj.bias.detach().float().numpy()
    np.testing.assert_array_equal(np.asarray(params["layers"]["bk"][0]).reshape(-1), bias)


def test_hub_ids_resolve_through_huggingface_hub(monkeypatch, tmp_path):
    import huggingface_hub

    from jaxinfer.checkpoints import sources

    asked = []

    def snapshot_download(repo_id, allow_patterns):
        asked.append((repo_id, allow_patterns))
        return str(tmp_path)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    assert sources.resolve("Qwen/Qwen3-0.6B") == tmp_path
    assert asked[0][0] == "Qwen/Qwen3-0.6B" and "*.safetensors" in asked[0][1]

    def offline(repo_id, allow_patterns):
        raise OSError("network is unreachable")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(ValueError, match=r"could not download 'Qwen/Qwen3-0\.6B' from the hub "
                                         r"\(OSError: network is unreachable\)"):
        sources.resolve("Qwen/Qwen3-0.6B")
