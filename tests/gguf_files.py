"""Writes small llama GGUF files from random transformers models, as llama.cpp's converter does.

The writer applies llama.cpp's Q/K rotary permutation itself, so loading them tests that
jaxinfer undoes it; transformers reading the same file is the independent reference.
"""

from __future__ import annotations

import math
from pathlib import Path

import gguf
import numpy as np


def permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.py's LlamaModel.permute (rotate_half -> interleaved)."""
    return (w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def llama3_rope_factors(cfg) -> np.ndarray | None:
    """llama.cpp convert_hf_to_gguf.py's rope_freqs tensor for "llama3" rope scaling."""
    scaling = cfg.rope_parameters
    if scaling.get("rope_type") != "llama3":
        return None
    dim = cfg.hidden_size // cfg.num_attention_heads
    freqs = 1.0 / scaling["rope_theta"] ** (np.arange(0, dim, 2, dtype=np.float32) / dim)
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_context = scaling["original_max_position_embeddings"]
    factors = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < old_context / high:
            factors.append(1.0)
        elif wavelen > old_context / low:
            factors.append(factor)
        else:
            smooth = (old_context / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(factors, np.float32)


def tiny_hf_llama(tie: bool = True, seed: int = 0, **overrides):
    """A random 2-layer transformers Llama with GQA (4 query heads, 2 kv heads)."""
    import torch
    import transformers

    torch.manual_seed(seed)
    settings = dict(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        rope_theta=10_000.0, rms_norm_eps=1e-5, tie_word_embeddings=tie,
    )
    config = transformers.LlamaConfig(**(settings | overrides))
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():  # norms away from 1 so a wrong norm weight shows up
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model


def write_llama_gguf(
    path: Path, model, tensor_type: gguf.GGMLQuantizationType = gguf.GGMLQuantizationType.F32,
    architecture: str = "llama",
) -> Path:
    """Writes `model` (a transformers LlamaForCausalLM) as GGUF; matrices in `tensor_type`."""
    cfg = model.config
    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_rope_freq_base(float(cfg.rope_parameters["rope_theta"]))
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    # A byte-level vocabulary so transformers can build a tokenizer if it wants one.
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list([f"<t{i}>" for i in range(cfg.vocab_size)])
    writer.add_token_types([1] * cfg.vocab_size)
    writer.add_token_merges([])

    def add(name: str, w: np.ndarray, matrix: bool = True) -> None:
        w = np.ascontiguousarray(w, dtype=np.float32)
        if matrix and tensor_type != gguf.GGMLQuantizationType.F32:
            if tensor_type == gguf.GGMLQuantizationType.F16:
                writer.add_tensor(name, w.astype(np.float16))
                return
            data = gguf.quants.quantize(w, tensor_type)
            writer.add_tensor(name, data, raw_shape=data.shape, raw_dtype=tensor_type)
        else:
            writer.add_tensor(name, w)

    state = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    add("token_embd.weight", state["model.embed_tokens.weight"])
    if (factors := llama3_rope_factors(cfg)) is not None:
        add("rope_freqs.weight", factors, matrix=False)
    add("output_norm.weight", state["model.norm.weight"], matrix=False)
    if not cfg.tie_word_embeddings:
        add("output.weight", state["lm_head.weight"])
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        add(f"blk.{i}.attn_norm.weight", state[p + "input_layernorm.weight"], matrix=False)
        add(f"blk.{i}.attn_q.weight",
            permute(state[p + "self_attn.q_proj.weight"], cfg.num_attention_heads))
        add(f"blk.{i}.attn_k.weight",
            permute(state[p + "self_attn.k_proj.weight"], cfg.num_key_value_heads))
        add(f"blk.{i}.attn_v.weight", state[p + "self_attn.v_proj.weight"])
        add(f"blk.{i}.attn_output.weight", state[p + "self_attn.o_proj.weight"])
        add(f"blk.{i}.ffn_norm.weight", state[p + "post_attention_layernorm.weight"], matrix=False)
        add(f"blk.{i}.ffn_gate.weight", state[p + "mlp.gate_proj.weight"])
        add(f"blk.{i}.ffn_up.weight", state[p + "mlp.up_proj.weight"])
        add(f"blk.{i}.ffn_down.weight", state[p + "mlp.down_proj.weight"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
