"""GGUF loading: layouts and rotary permutation against transformers, and clear errors."""

from __future__ import annotations

import gguf
import jax.numpy as jnp
import numpy as np
import pytest
from gguf_files import tiny_hf_llama, write_llama_gguf

import jaxinfer
from jaxinfer.cache import KVCache
from jaxinfer.checkpoints import CheckpointError, sources
from jaxinfer.checkpoints.gguf import load_gguf
from jaxinfer.models import llama

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
Q = gguf.GGMLQuantizationType


def jax_logits(cfg, params, ids: np.ndarray) -> np.ndarray:
    batch, seq = ids.shape
    positions = jnp.broadcast_to(jnp.arange(seq), (batch, seq))
    cache = KVCache.init(cfg, batch, seq)
    logits, _ = llama.forward(params, jnp.asarray(ids), positions, cache, cfg)
    return np.asarray(logits)


@pytest.mark.numerics
@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("tensor_type", [Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0,
                                         Q.Q5_1],
                         ids=lambda t: t.name)
def test_tiny_gguf_matches_transformers_on_the_same_file(tmp_path, tie, tensor_type):
    path = write_llama_gguf(tmp_path / "tiny.gguf", tiny_hf_llama(tie), tensor_type)
    cfg, params, _ = load_gguf(path, progress=False)
    reference = transformers.AutoModelForCausalLM.from_pretrained(
        str(tmp_path), gguf_file=path.name, dtype=torch.float32
    )
    ids = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 12))
    with torch.no_grad():
        expected = reference(torch.tensor(ids)).logits.numpy()
    np.testing.assert_allclose(jax_logits(cfg, params, ids), expected, atol=1e-5, rtol=1e-5)
    assert cfg.tie_embeddings == tie and cfg.n_kv_heads == 2


@pytest.mark.numerics
def test_f32_gguf_reproduces_the_original_model_exactly(tmp_path):
    """Writing applies llama.cpp's Q/K permutation; loading must undo it."""
    original = tiny_hf_llama()
    path = write_llama_gguf(tmp_path / "tiny.gguf", original)
    cfg, params, _ = load_gguf(path, progress=False)
    ids = np.arange(20).reshape(1, 20) * 7 % cfg.vocab_size
    with torch.no_grad():
        expected = original(torch.tensor(ids)).logits.numpy()
    np.testing.assert_allclose(jax_logits(cfg, params, ids), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.numerics
def test_llama3_rope_scaling_from_rope_freqs_matches_the_original_model(tmp_path):
    """Llama 3.1+ GGUFs carry rope scaling as a rope_freqs tensor of per-frequency divisors."""
    scaling = {"rope_type": "llama3", "rope_theta": 10_000.0, "factor": 8.0,
               "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 32}  # small, so all three regimes occur
    original = tiny_hf_llama(rope_parameters=scaling)
    path = write_llama_gguf(tmp_path / "tiny.gguf", original)
    cfg, params, _ = load_gguf(path, progress=False)
    assert cfg.rope_freq_factors is not None and len(set(cfg.rope_freq_factors)) > 2
    ids = np.arange(120).reshape(1, 120) * 5 % cfg.vocab_size
    with torch.no_grad():
        expected = original(torch.tensor(ids)).logits.numpy()
    np.testing.assert_allclose(jax_logits(cfg, params, ids), expected, atol=1e-5, rtol=1e-5)


def test_bfloat16_load_keeps_bfloat16_weights(tmp_path):
    path = write_llama_gguf(tmp_path / "tiny.gguf", tiny_hf_llama())
    cfg, params, _ = load_gguf(path, dtype="bfloat16", progress=False)
    assert cfg.compute_dtype == "bfloat16"
    assert params["layers"]["wq"].dtype == jnp.bfloat16


def test_unknown_model_name_lists_known_names():
    with pytest.raises(ValueError, match="unknown model 'no-such-model'.*smollm2-135m-instruct"):
        jaxinfer.load_model("no-such-model")


def test_missing_gguf_file_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.gguf does not exist"):
        jaxinfer.load_model(str(tmp_path / "missing.gguf"))


def test_truncated_gguf_says_where_data_ends(tmp_path):
    path = write_llama_gguf(tmp_path / "tiny.gguf", tiny_hf_llama())
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 1000])
    with pytest.raises(CheckpointError, match=r"tiny.gguf: .*truncated or corrupt"):
        load_gguf(path, progress=False)


@pytest.mark.parametrize("cut", [10, 200], ids=["in-magic", "in-metadata"])
def test_gguf_cut_inside_the_header_is_a_clear_error(tmp_path, cut):
    path = write_llama_gguf(tmp_path / "tiny.gguf", tiny_hf_llama())
    path.write_bytes(path.read_bytes()[:cut])
    with pytest.raises(CheckpointError, match="tiny.gguf: .*truncated or corrupt"):
        load_gguf(path, progress=False)


def test_file_that_is_not_gguf_is_a_clear_error(tmp_path):
    path = tmp_path / "random.gguf"
    path.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(CheckpointError, match="random.gguf: not a readable GGUF file"):
        load_gguf(path, progress=False)


def test_unsupported_architecture_is_named(tmp_path):
    path = write_llama_gguf(tmp_path / "tiny.gguf", tiny_hf_llama(), architecture="mamba")
    with pytest.raises(CheckpointError, match="unsupported architecture 'mamba'; supported: llama"):
        load_gguf(path, progress=False)


def test_unsupported_tensor_type_is_named(tmp_path):
    # TQ1_0 packs 256 weights a block: every matrix needs rows of 256.
    model = tiny_hf_llama(hidden_size=256, intermediate_size=256)
    path = write_llama_gguf(tmp_path / "tiny.gguf", model, Q.TQ1_0)
    with pytest.raises(CheckpointError, match="has type TQ1_0; supported: F32, F16, BF16, Q8_0"):
        load_gguf(path, progress=False)


def test_default_model_resolves_to_the_packaged_gguf(smollm2_path):
    assert smollm2_path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert smollm2_path == sources.resolve("smollm2-135m-instruct")


def test_default_model_config_is_smollm2_135m(smollm2):
    cfg = smollm2.config
    assert (cfg.n_layers, cfg.embed_dim, cfg.n_heads, cfg.n_kv_heads) == (30, 576, 9, 3)
    assert (cfg.vocab_size, cfg.max_seq_len, cfg.rope_theta) == (49152, 8192, 100_000.0)
    assert cfg.tie_embeddings
