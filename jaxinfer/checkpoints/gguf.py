"""GGUF checkpoints (llama.cpp's format) -> a `Model`.

`gguf_file` parses the file (memory-mapped); this module checks it against its size, maps
the metadata to a ModelConfig over the shared family table, and describes the tensors as a
tensor source for `pipeline.assemble`: dequantized by the `gguf` package (or kept as their
own blocks for quant="gguf"), llama.cpp's Q/K rotary permutation undone.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from jaxinfer.checkpoints import gguf_quant, gguf_vocab, pipeline
from jaxinfer.checkpoints.families import quirks
from jaxinfer.checkpoints.gguf_file import GGUFFile, GGUFTensor, open_gguf
from jaxinfer.checkpoints.model import CheckpointError, Model, OnConfig
from jaxinfer.config import ModelConfig

T = gguf.GGMLQuantizationType
SUPPORTED_TYPES = (
    T.F32, T.F16, T.BF16, T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q4_K, T.Q5_K, T.Q6_K
)
DEQUANTIZE_ROWS = 4096
FAST_TYPES = (T.Q8_0, T.Q4_0, T.Q4_1)  # dequantized here (`_dequantize_groups`)
GGUFError = CheckpointError  # the name older callers catch

# general.architecture values this loader reads; their tensors are named as below. A llama
# file with experts is Mixtral (llama.cpp converts Mixtral as "llama").
ARCHITECTURES = ("llama", "gemma3", "qwen3moe")
FAMILY_OF = {"qwen3moe": "qwen3_moe"}  # general.architecture -> ours, where the names differ
# GGUF tensor name (per layer, after "blk.{i}.") -> (our parameter, layout in pipeline.LAYOUTS).
# Every norm is stored as its whole scale (offset + w); q and k rows are permuted for the
# families the family table marks (`gguf_qk_permuted`).
LAYER_TENSORS = {
    "attn_norm.weight": ("attn_norm", "norm"),
    "attn_q.weight": ("wq", "qkv"),
    "attn_k.weight": ("wk", "qkv"),
    "attn_v.weight": ("wv", "qkv"),
    "attn_q_norm.weight": ("q_norm", "norm"),
    "attn_k_norm.weight": ("k_norm", "norm"),
    "attn_output.weight": ("wo", "o"),
    "post_attention_norm.weight": ("post_attn_norm", "norm"),
    "ffn_norm.weight": ("mlp_norm", "norm"),
    "ffn_gate.weight": ("w_gate", "in_out"),
    "ffn_up.weight": ("w_up", "in_out"),
    "ffn_down.weight": ("w_down", "in_out"),
    "post_ffw_norm.weight": ("post_mlp_norm", "norm"),
    # mixtures of experts: the router, and each layer's experts stacked [experts, out, in]
    "ffn_gate_inp.weight": ("router", "in_out"),
    "ffn_gate_exps.weight": ("expert_gate", "experts_in_out"),
    "ffn_up_exps.weight": ("expert_up", "experts_in_out"),
    "ffn_down_exps.weight": ("expert_down", "experts_in_out"),
}
GLOBAL_TENSORS = {
    "token_embd.weight": ("embed", "vector"),
    "output_norm.weight": ("final_norm", "norm"),
    "output.weight": ("lm_head", "vector"),
}
CONFIG_TENSORS = ("rope_freqs.weight",)  # read into the ModelConfig, not a parameter


def metadata(reader: GGUFFile, key: str, default: Any = None) -> Any:
    return reader.get(key, default)


def model_config(reader: GGUFFile) -> ModelConfig:
    """The architecture hyperparameters from the GGUF metadata, quirks from the family table."""
    arch = metadata(reader, "general.architecture")
    if arch not in ARCHITECTURES:
        raise CheckpointError(f"{reader.path}: unsupported architecture {arch!r}; "
                              f"supported: {', '.join(ARCHITECTURES)}")
    n_experts = int(metadata(reader, f"{arch}.expert_count", 0) or 0)
    family_name = "mixtral" if arch == "llama" and n_experts else FAMILY_OF.get(arch, arch)
    fam = quirks(family_name, reader.path)

    def get(key: str, default: Any = None) -> Any:
        value = metadata(reader, f"{arch}.{key}", default)
        if value is None:
            raise CheckpointError(f"{reader.path}: missing metadata key {arch}.{key}")
        return value

    tensors = {t.name: t for t in reader.tensors}
    n_layers, embed_dim = int(get("block_count")), int(get("embedding_length"))
    n_heads = int(get("attention.head_count"))
    head_dim = int(get("attention.key_length", embed_dim // n_heads))
    tokens = metadata(reader, "tokenizer.ggml.tokens")
    vocab = get("vocab_size", len(tokens) if tokens else None)
    moe = {} if not n_experts else dict(
        n_experts=n_experts,
        experts_per_token=int(get("expert_used_count")),
        expert_mlp_dim=int(get("expert_feed_forward_length", get("feed_forward_length"))),
        # llama.cpp renormalises Mixtral's and Qwen3-MoE's top-k weights unless told otherwise
        router_renormalize=bool(get("expert_weights_norm", True)),
    )
    fields = dict(
        **moe,
        architecture=family_name,
        vocab_size=int(vocab),
        embed_dim=embed_dim,
        n_layers=n_layers,
        n_heads=n_heads,
        n_kv_heads=int(get("attention.head_count_kv", n_heads)),
        head_dim=head_dim,
        mlp_dim=int(get("feed_forward_length")),
        max_seq_len=int(get("context_length")),
        rope_theta=float(get("rope.freq_base", 10_000.0)),
        rms_eps=float(get("attention.layer_norm_rms_epsilon")),
        tie_embeddings="output.weight" not in tensors,
        rope_freq_factors=(
            tuple(map(float, dequantize(reader, tensors["rope_freqs.weight"])))
            if "rope_freqs.weight" in tensors else None
        ),
        mlp_activation=fam.mlp_activation,
        **fam.fields(embed_dim),
    )
    if fam.sliding_pattern is not None:  # Gemma 3: what llama.cpp fixes for the arch
        scaling, factor = get("rope.scaling.type", "none"), float(get("rope.scaling.factor", 1.0))
        if scaling not in ("none", "linear"):
            raise CheckpointError(f"{reader.path}: {arch} rope scaling {scaling!r} is not "
                                  "supported; supported: linear")
        fields.update(
            sliding_window=int(get("attention.sliding_window")),
            layer_types=fam.layer_types(n_layers),
            rope_local_theta=fam.local_rope_theta,
            # Linear scaling divides the global layers' frequencies by the factor.
            rope_freq_factors=(factor,) * (head_dim // 2) if scaling == "linear" else None,
            # llama.cpp: 27B (62 layers) scales queries by (embed / heads)^-1/2, others head_dim's.
            query_pre_attn_scalar=float(embed_dim // n_heads if n_layers == 62 else head_dim),
        )
    return ModelConfig(**fields)


def dequantize(reader: GGUFFile, tensor: GGUFTensor) -> np.ndarray:
    """The tensor as fp32 in numpy order (GGUF's dims reversed: [out, in] for matrices).

    Large tensors go in row chunks: the gguf package's numpy code makes several
    full-size temporaries, which for an embedding table would dominate peak memory.
    """
    if tensor.tensor_type not in SUPPORTED_TYPES:
        supported = ", ".join(t.name for t in SUPPORTED_TYPES)
        raise CheckpointError(f"{reader.path}: tensor {tensor.name!r} has type "
                              f"{tensor.tensor_type.name}; supported: {supported}")
    data, kind = tensor.data, tensor.tensor_type
    if kind == T.F32:
        return data
    if kind in FAST_TYPES and data.ndim == 2:
        return _dequantize_groups(tensor)
    if data.ndim != 2 or data.shape[0] <= DEQUANTIZE_ROWS:
        return gguf.quants.dequantize(data, kind).astype(np.float32, copy=False)
    first = gguf.quants.dequantize(data[:DEQUANTIZE_ROWS], kind)
    out = np.empty((data.shape[0], first.shape[1]), np.float32)
    out[:DEQUANTIZE_ROWS] = first
    for row in range(DEQUANTIZE_ROWS, data.shape[0], DEQUANTIZE_ROWS):
        out[row : row + DEQUANTIZE_ROWS] = gguf.quants.dequantize(
            data[row : row + DEQUANTIZE_ROWS], kind)
    return out


def _dequantize_groups(tensor: GGUFTensor) -> np.ndarray:
    """Q8_0 / Q4_0 / Q4_1 as q * scale (+ zero) per group of 32, from `gguf_quant.blocks`: the
    gguf package's numbers (same float operations) without its per-row-group Python loop,
    about twice as fast."""
    values, scales, zeros, bits = gguf_quant.blocks(tensor)
    rows = values.shape[0]
    if bits == 8:
        out = values.reshape(rows, -1, 32).astype(np.float32)
    else:  # byte i of a group: element i in the low nibble, element i + 16 in the high one
        packed = values.reshape(rows, -1, 16)
        out = np.empty((rows, packed.shape[1], 32), np.float32)
        np.bitwise_and(packed, 15, out=out[..., :16], casting="unsafe")
        np.right_shift(packed, 4, out=out[..., 16:], casting="unsafe")
    out *= scales[..., None]
    if zeros is not None:
        out += zeros[..., None]
    return out.reshape(rows, -1)


@dataclasses.dataclass
class GGUFSource:
    """A GGUF file as a tensor source for `pipeline.assemble`."""

    reader: GGUFFile
    cfg: ModelConfig
    config_name = "the GGUF metadata"

    @property
    def name(self) -> str:
        return str(self.reader.path)

    @property
    def tensors(self) -> list[pipeline.StoredTensor]:
        permuted = quirks(self.cfg.architecture, self.reader.path).gguf_qk_permuted
        out = []
        for t in self.reader.tensors:
            if t.name in CONFIG_TENSORS:
                continue
            if t.name.startswith("blk."):
                _, index, suffix = t.name.split(".", 2)
                param, layout = LAYER_TENSORS.get(suffix, (None, "vector"))
                layer = int(index) if index.isdigit() else -1
                if permuted and param in ("wq", "wk"):
                    layout = "qkv_rotary"
            else:
                (param, layout), layer = GLOBAL_TENSORS.get(t.name, (None, "vector")), None
            out.append(pipeline.StoredTensor(
                t.name, param, layer, layout, tuple(reversed(t.shape)),
                read=lambda t=t: dequantize(self.reader, t),
                read_blocks=lambda storage, axis, rows_order, t=t: gguf_quant.to_qarray(
                    t, storage, axis, rows_order)))
        return out

    def release(self) -> None:
        self.reader.release()


def load_gguf(
    path: str | os.PathLike,
    *,
    dtype: str = "float32",
    mesh: Any = None,
    quant: str | None = None,
    progress: bool = True,
    tokenizer_cache: Path | None = gguf_vocab.CACHE,
    on_config: OnConfig | None = None,
) -> Model:
    """A `Model` from a GGUF file: weights dequantized to `dtype` (or quantized, see
    `jaxinfer.load_model`) and, given a `jax.sharding.Mesh`, placed on their shardings over
    it as they are read. The tokenizer comes from `tokenizer_cache` when built before
    (None: always build it). `on_config(config, tokenizer)` is called before any weight is
    read."""
    reader = open_gguf(path)
    cfg = dataclasses.replace(model_config(reader).with_dtype(dtype), quant=quant)
    tokenizer = gguf_vocab.tokenizer(reader, cache=tokenizer_cache)
    if on_config is not None:
        on_config(cfg, tokenizer)
    params = pipeline.assemble(GGUFSource(reader, cfg), cfg, mesh=mesh, progress=progress)
    return Model(cfg, params, tokenizer)
