"""Quantized models: GGUF blocks kept as they are, int8/int4 at load, perplexity, errors."""

from __future__ import annotations

import dataclasses
import pydoc_data.topics
from types import SimpleNamespace

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxinfer
from jaxinfer import quant
from jaxinfer.cache import KVCache
from jaxinfer.checkpoints import gguf_quant
from jaxinfer.checkpoints.gguf import load_gguf
from jaxinfer.evaluate import perplexity
from jaxinfer.models import family
from tests.gguf_files import tiny_hf_llama, write_llama_gguf
from tests.numerics import assert_logits_close, assert_top1_agrees_where_decisive

T = gguf.GGMLQuantizationType
PROMPT = "The capital of France is Paris, and the capital of Germany is"


def _logits(params, cfg, tokens):
    tokens = jnp.asarray([tokens])
    positions = jnp.arange(tokens.shape[1])[None]
    forward = jax.jit(family(cfg.architecture).forward, static_argnames="cfg")
    logits, _ = forward(params, tokens, positions, KVCache.init(cfg, 1, tokens.shape[1]), cfg=cfg)
    return np.asarray(logits[0])


@pytest.fixture(scope="module")
def smollm2_gguf_native(smollm2_path):
    """The GGUF's own blocks; CPU kernels with fp32 activations (exact up to summation order;
    their int8 activations are tested in test_cpu_kernels.py)."""
    model = jaxinfer.load_model(str(smollm2_path), dtype="float32", quant="gguf", progress=False)
    return model._replace(config=dataclasses.replace(model.config, cpu_kernels="f32"))


@pytest.mark.numerics
@pytest.mark.parametrize("tensor_type", [T.Q8_0, T.Q4_0, T.Q4_1])
def test_native_gguf_blocks_give_the_dequantized_models_logits(tmp_path, tensor_type):
    path = tmp_path / "tiny.gguf"
    # head_dim 32: GGUF's 32-value blocks then never straddle two heads of the output matrix
    model = tiny_hf_llama(tie=False, num_attention_heads=2, num_key_value_heads=1)
    write_llama_gguf(path, model, tensor_type)
    cfg, dense, _ = load_gguf(path, progress=False)
    qcfg, native, _ = load_gguf(path, quant="gguf", progress=False)
    qcfg = dataclasses.replace(qcfg, cpu_kernels="f32")  # exact activations
    assert qcfg.quant == "gguf" and quant.is_quantized(native["layers"]["wq"])
    assert native["layers"]["wq"].bits == (8 if tensor_type == T.Q8_0 else 4)
    for name in ("wq", "wk", "wo", "w_down"):  # the same weights, exactly representable
        np.testing.assert_allclose(quant.dequantize(native["layers"][name]),
                                   dense["layers"][name], atol=1e-6)
    tokens = list(range(1, 30))
    np.testing.assert_allclose(_logits(native, qcfg, tokens), _logits(dense, cfg, tokens),
                               atol=1e-4)


@pytest.mark.numerics
def test_smollm2_kept_in_its_gguf_blocks_matches_the_dequantized_model(smollm2,
                                                                       smollm2_gguf_native):
    """Q4_1 matrices and the Q8_0 embedding stay quantized: ~5x fewer parameter bytes, and
    logits within 1e-4 of the range of the fp32 model (float summation order differs; measured
    9e-7) along the prompt and the fp32 model's 16 greedy tokens, whose top-1 the GGUF model
    keeps wherever it is decisive (top-2 margin over twice that)."""
    prompt = smollm2.tokenizer.encode(PROMPT)
    greedy = jaxinfer.generate(smollm2.params, [prompt], smollm2.config,
                               max_new_tokens=16).tokens[0]
    tokens = prompt + greedy[:-1]
    want = _logits(smollm2.params, smollm2.config, tokens)
    got = _logits(smollm2_gguf_native.params, smollm2_gguf_native.config, tokens)
    atol = 1e-4 * float(np.ptp(want))
    worst = assert_logits_close(got, want, atol)
    checked = assert_top1_agrees_where_decisive(got, want, atol)
    print(f"GGUF blocks: max |diff| {worst:.1e} (tolerance {atol:.1e}); {checked:.0%} decisive")
    assert quant.param_bytes(smollm2_gguf_native.params) * 4 < quant.param_bytes(smollm2.params)


def test_int8_at_load_quantizes_matrices_and_keeps_vectors_float(smollm2_path):
    cfg, params, _ = load_gguf(smollm2_path, quant="int8", progress=False)
    layers = params["layers"]
    assert cfg.quant == "int8"
    for name in quant.CONTRACTION_AXES:
        if name in layers:
            assert layers[name].bits == 8 and layers[name].values.dtype == jnp.int8
            assert layers[name].shape == tuple(family("llama").abstract_params(cfg)["layers"]
                                               [name].shape)
    assert not quant.is_quantized(layers["attn_norm"]) and quant.is_quantized(params["embed"])


def test_perplexity_on_python_documentation_text(smollm2, smollm2_gguf_native, smollm2_path):
    """Real English prose shipped with Python (its reference manual's topic pages). int8 stays
    within 1% of the float model, int4 (groups of 32) within 10%; the GGUF's own Q4_1 blocks
    are the very weights the float model was dequantized from."""
    text = pydoc_data.topics.topics["exceptions"] + pydoc_data.topics.topics["execmodel"]
    tokens = smollm2.tokenizer.encode(text)[:512]
    scores = {"float32": perplexity(smollm2.params, smollm2.config, tokens, window=512),
              "gguf": perplexity(smollm2_gguf_native.params, smollm2_gguf_native.config, tokens,
                                 window=512)}
    for precision in ("int8", "int4"):
        cfg, params, _ = load_gguf(smollm2_path, quant=precision, progress=False)
        scores[precision] = perplexity(params, cfg, tokens, window=512)
    print("perplexity:", {k: round(v, 3) for k, v in scores.items()})
    assert 5 < scores["float32"] < 50  # a sane language model on English text
    assert abs(scores["gguf"] / scores["float32"] - 1) < 1e-4
    assert abs(scores["int8"] / scores["float32"] - 1) < 0.01
    assert abs(scores["int4"] / scores["float32"] - 1) < 0.10


def test_q4_k_blocks_match_the_gguf_packages_dequantization(rng):
    """Random Q4_K super-blocks (fp16 factors, 6-bit sub-block scales and mins, 4-bit values)
    regrouped into int4 groups of 32 give exactly the gguf package's floats."""
    rows, blocks_per_row = 8, 3
    raw = rng.integers(0, 256, (rows, blocks_per_row, 144), dtype=np.uint8)
    factors = rng.uniform(-0.05, 0.05, (rows, blocks_per_row, 2)).astype(np.float16)
    raw[..., :4] = factors.view(np.uint8).reshape(rows, blocks_per_row, 4)
    data = raw.reshape(rows, -1)
    tensor = SimpleNamespace(data=data, tensor_type=T.Q4_K)
    values, scales, zeros, bits = gguf_quant.blocks(tensor)
    q = quant.QArray(values, scales, zeros, bits, 32, -1)
    want = gguf.quants.dequantize(data, T.Q4_K)
    np.testing.assert_allclose(quant.dequantize(q), want, rtol=1e-6, atol=1e-7)


def test_unknown_quant_mode_is_rejected():
    with pytest.raises(ValueError, match="quant='int2'; allowed: None, int8, int4, gguf"):
        jaxinfer.load_model(quant="int2")


def test_gguf_quant_needs_a_gguf_file(tmp_path):
    from jaxinfer.api import _quantize

    with pytest.raises(ValueError, match="not a GGUF file: use int8 or int4"):
        _quantize(None, {}, "gguf", tmp_path)
