"""GGUF checkpoints (llama.cpp's format) -> ModelConfig and a params pytree.

The `gguf` package parses the file (memory-mapped) and dequantizes blocks; this module
checks the header against the file's size, maps metadata keys to a ModelConfig, and
places tensors into the stacked layout of `jaxinfer.models`, one tensor at a time.
"""

from __future__ import annotations

import dataclasses
import mmap
import os
import sys
import time
from pathlib import Path
from typing import Any

import gguf
import jax
import numpy as np

from jaxinfer.checkpoints import gguf_quant
from jaxinfer.config import NP_DTYPES, ModelConfig
from jaxinfer.models import family
from jaxinfer.quant import CONTRACTION_AXES, quantize
from jaxinfer.quant.qarray import stored_shape
from jaxinfer.sharding import param_shardings
from jaxinfer.sharding.rules import place, sharding_at

T = gguf.GGMLQuantizationType
SUPPORTED_TYPES = (
    T.F32, T.F16, T.BF16, T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q4_K, T.Q5_K, T.Q6_K
)
DEQUANTIZE_ROWS = 4096

# GGUF tensor name (per layer: "blk.{i}.") -> (our parameter, how to turn the GGUF array,
# numpy order [out, in], into our layout). "q" and "k" also undo llama.cpp's rotary permutation.
LAYER_TENSORS = {
    "attn_norm.weight": ("attn_norm", "vector"),
    "attn_q.weight": ("wq", "q"),
    "attn_k.weight": ("wk", "k"),
    "attn_v.weight": ("wv", "kv_in_out"),
    "attn_output.weight": ("wo", "o"),
    "ffn_norm.weight": ("mlp_norm", "vector"),
    "ffn_gate.weight": ("w_gate", "in_out"),
    "ffn_up.weight": ("w_up", "in_out"),
    "ffn_down.weight": ("w_down", "in_out"),
}
# Gemma 3: no rotary permutation (llama.cpp runs it NEOX-style, i.e. rotate_half), q/k norms,
# norms on the block outputs; llama.cpp's converter stored every norm as (1 + w).
GEMMA3_LAYER_TENSORS = {
    "attn_norm.weight": ("attn_norm", "norm"),
    "attn_q.weight": ("wq", "q_in_out"),
    "attn_k.weight": ("wk", "kv_in_out"),
    "attn_v.weight": ("wv", "kv_in_out"),
    "attn_q_norm.weight": ("q_norm", "norm"),
    "attn_k_norm.weight": ("k_norm", "norm"),
    "attn_output.weight": ("wo", "o"),
    "post_attention_norm.weight": ("post_attn_norm", "norm"),
    "ffn_norm.weight": ("mlp_norm", "norm"),
    "ffn_gate.weight": ("w_gate", "in_out"),
    "ffn_up.weight": ("w_up", "in_out"),
    "ffn_down.weight": ("w_down", "in_out"),
    "post_ffw_norm.weight": ("post_mlp_norm", "norm"),
}
ARCH_LAYER_TENSORS = {"llama": LAYER_TENSORS, "gemma3": GEMMA3_LAYER_TENSORS}
GEMMA3_SLIDING_PATTERN = 6  # every 6th layer global, the rest sliding (llama.cpp's swa pattern)
GEMMA3_LOCAL_ROPE_BASE = 10_000.0  # llama.cpp's rope_freq_base_train_swa for gemma3
GLOBAL_TENSORS = {
    "token_embd.weight": "embed",
    "output_norm.weight": "final_norm",
    "output.weight": "lm_head",
}


class GGUFError(ValueError):
    """A GGUF file that cannot be loaded; the message names the file and the problem."""


def open_gguf(path: str | os.PathLike) -> gguf.GGUFReader:
    """Parses the header and checks that every tensor's data lies inside the file."""
    path = Path(path)
    if not path.is_file():
        raise GGUFError(f"{path}: no such file")
    size = path.stat().st_size
    try:
        reader = gguf.GGUFReader(path)
    except Exception as e:  # the parser raises assorted errors on corrupt headers
        raise GGUFError(
            f"{path}: not a readable GGUF file, truncated or corrupt ({type(e).__name__}: {e})"
        ) from e
    for t in reader.tensors:
        end = t.data_offset + t.n_bytes
        if end > size:
            raise GGUFError(
                f"{path}: truncated or corrupt: tensor {t.name!r} ends at byte {end:,} "
                f"but the file has {size:,} bytes"
            )
    return reader


def metadata(reader: gguf.GGUFReader, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def model_config(reader: gguf.GGUFReader) -> ModelConfig:
    """Reads the architecture hyperparameters from the GGUF metadata."""
    arch = metadata(reader, "general.architecture")
    if arch not in ARCH_LAYER_TENSORS:
        raise GGUFError(f"{reader.data.filename}: unsupported architecture {arch!r}; "
                        f"supported: {', '.join(ARCH_LAYER_TENSORS)}")

    def get(key: str, default: Any = None) -> Any:
        value = metadata(reader, f"{arch}.{key}", default)
        if value is None:
            raise GGUFError(f"{reader.data.filename}: missing metadata key {arch}.{key}")
        return value

    tensors = {t.name: t for t in reader.tensors}
    n_heads = get("attention.head_count")
    embed_dim = get("embedding_length")
    tokens = metadata(reader, "tokenizer.ggml.tokens")
    vocab = get("vocab_size", len(tokens) if tokens else None)
    fields = dict(
        architecture=arch,
        vocab_size=int(vocab),
        embed_dim=int(embed_dim),
        n_layers=int(get("block_count")),
        n_heads=int(n_heads),
        n_kv_heads=int(get("attention.head_count_kv", n_heads)),
        head_dim=int(get("attention.key_length", embed_dim // n_heads)),
        mlp_dim=int(get("feed_forward_length")),
        max_seq_len=int(get("context_length")),
        rope_theta=float(get("rope.freq_base", 10_000.0)),
        rms_eps=float(get("attention.layer_norm_rms_epsilon")),
        tie_embeddings="output.weight" not in tensors,
        rope_freq_factors=(
            tuple(map(float, dequantize(reader, tensors["rope_freqs.weight"])))
            if "rope_freqs.weight" in tensors else None
        ),
    )
    if arch == "gemma3":
        fields.update(_gemma3_quirks(get))
    return ModelConfig(**fields)


def _gemma3_quirks(get) -> dict[str, Any]:
    """Gemma 3's ModelConfig fields, from metadata and what llama.cpp fixes for the arch."""
    n_layers, embed_dim = int(get("block_count")), int(get("embedding_length"))
    n_heads = int(get("attention.head_count"))
    head_dim = int(get("attention.key_length", embed_dim // n_heads))
    scaling, factor = get("rope.scaling.type", "none"), float(get("rope.scaling.factor", 1.0))
    if scaling not in ("none", "linear"):
        raise GGUFError(f"gemma3 rope scaling {scaling!r} is not supported; supported: linear")
    pattern = GEMMA3_SLIDING_PATTERN
    return dict(
        qk_norm=True,
        norm_offset=1.0,
        embed_scale=embed_dim**0.5,
        mlp_activation="gelu_tanh",
        post_norms=True,
        sliding_window=int(get("attention.sliding_window")),
        layer_types=tuple("full_attention" if i % pattern == pattern - 1 else "sliding_attention"
                          for i in range(n_layers)),
        rope_local_theta=GEMMA3_LOCAL_ROPE_BASE,
        # Linear scaling divides the global layers' frequencies by the factor.
        rope_freq_factors=(factor,) * (head_dim // 2) if scaling == "linear" else None,
        # llama.cpp: 27B (62 layers) scales queries by (embed / heads)^-1/2, others head_dim's.
        query_pre_attn_scalar=float(embed_dim // n_heads if n_layers == 62 else head_dim),
    )


def dequantize(reader: gguf.GGUFReader, tensor: gguf.ReaderTensor) -> np.ndarray:
    """The tensor as fp32 in numpy order (GGUF's dims reversed: [out, in] for matrices).

    Large tensors go in row chunks: the gguf package's numpy code makes several
    full-size temporaries, which for an embedding table would dominate peak memory.
    """
    if tensor.tensor_type not in SUPPORTED_TYPES:
        supported = ", ".join(t.name for t in SUPPORTED_TYPES)
        raise GGUFError(f"{reader.data.filename}: tensor {tensor.name!r} has type "
                        f"{tensor.tensor_type.name}; supported: {supported}")
    data, kind = tensor.data, tensor.tensor_type
    if data.ndim != 2 or data.shape[0] <= DEQUANTIZE_ROWS:
        return gguf.quants.dequantize(data, kind).astype(np.float32, copy=False)
    first = gguf.quants.dequantize(data[:DEQUANTIZE_ROWS], kind)
    out = np.empty((data.shape[0], first.shape[1]), np.float32)
    out[:DEQUANTIZE_ROWS] = first
    for row in range(DEQUANTIZE_ROWS, data.shape[0], DEQUANTIZE_ROWS):
        out[row : row + DEQUANTIZE_ROWS] = gguf.quants.dequantize(
            data[row : row + DEQUANTIZE_ROWS], kind)
    return out


def unpermute_rotary(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undoes llama.cpp's Q/K row permutation (interleaved rotary -> rotate_half order)."""
    out_dim = w.shape[0]
    return (w.reshape(n_heads, out_dim // n_heads // 2, 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def to_layout(w: np.ndarray, kind: str, cfg: ModelConfig) -> np.ndarray:
    """GGUF numpy-order array -> our parameter layout (see models/llama.py)."""
    D, H, K, Dh = cfg.embed_dim, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    if kind == "vector":
        return w
    if kind == "norm":  # stored as the whole scale (offset + w)
        return w - np.float32(cfg.norm_offset)
    if kind == "q_in_out":
        return w.T.reshape(D, H, Dh)
    if kind == "q":
        return unpermute_rotary(w, H).T.reshape(D, H, Dh)
    if kind == "k":
        return unpermute_rotary(w, K).T.reshape(D, K, Dh)
    if kind == "kv_in_out":
        return w.T.reshape(D, K, Dh)
    if kind == "o":
        return w.T.reshape(H, Dh, D)
    if kind == "in_out":
        return w.T
    raise AssertionError(kind)


def load_params(
    reader: gguf.GGUFReader,
    cfg: ModelConfig,
    *,
    shardings: Any = None,
    quant: str | None = None,
    progress: bool = True,
) -> dict:
    """Reads, dequantizes and converts the tensors one parameter at a time, placing each on
    its target sharding before reading the next.

    `shardings`: a params-shaped pytree of Shardings (`jaxinfer.sharding.param_shardings`);
    None puts everything on the default device. A stacked per-layer weight is filled on the
    host layer by layer, placed, and freed, so host memory peaks near the parameters placed
    so far plus one stacked weight; each process copies only the slices its devices hold.

    `quant`: matrices become QArrays as they are read: "int8" / "int4" quantize the floats,
    "gguf" keeps the file's Q8_0 / Q4_0 / Q4_1 / Q4_K blocks as they are (other types: int8).
    """
    if quant is not None and shardings is not None:
        raise ValueError("quantized weights cannot be placed on a mesh yet; load them on one "
                         "device (mesh=None) or without quant")
    filename = reader.data.filename
    np_dtype = NP_DTYPES[cfg.param_dtype]
    abstract = family(cfg.architecture).abstract_params(cfg)
    # Sort the file's tensors into parameters before reading any data.
    layer_tensors: dict[str, dict[int, tuple[gguf.ReaderTensor, str]]] = {
        param: {} for param in abstract["layers"]}
    global_tensors: dict[str, gguf.ReaderTensor] = {}
    table = ARCH_LAYER_TENSORS[cfg.architecture]
    for tensor in reader.tensors:
        name = tensor.name
        if name.startswith("blk."):
            _, index, suffix = name.split(".", 2)
            if suffix not in table or not 0 <= int(index) < cfg.n_layers:
                raise GGUFError(f"{filename}: unexpected tensor {name!r} for a "
                                f"{cfg.architecture} model")
            param, kind = table[suffix]
            layer_tensors[param][int(index)] = (tensor, kind)
        elif name in GLOBAL_TENSORS:
            global_tensors[GLOBAL_TENSORS[name]] = tensor
        elif name == "rope_freqs.weight":
            pass  # read into ModelConfig.rope_freq_factors
        else:
            raise GGUFError(f"{filename}: unexpected tensor {name!r} for a "
                            f"{cfg.architecture} model")
    missing = [k for k in abstract if k != "layers" and k not in global_tensors] + [
        f"layers.{p}.{i}" for p in abstract["layers"] for i in range(cfg.n_layers)
        if i not in layer_tensors[p]]
    if missing:
        raise GGUFError(f"{filename}: missing tensors: {', '.join(missing[:8])}"
                        + (" ..." if len(missing) > 8 else ""))

    total, done, start = len(reader.tensors), 0, time.perf_counter()

    def tick() -> None:
        nonlocal done
        done += 1
        if progress and (done % 16 == 0 or done == total):
            print(f"\rloading {Path(filename).name}: {done}/{total} tensors "
                  f"({time.perf_counter() - start:.1f}s)", end="", file=sys.stderr, flush=True)

    params: dict = {"layers": {}}
    for param, tensor in global_tensors.items():
        if quant and param in CONTRACTION_AXES:
            params[param] = jax.device_put(
                _quantized(reader, [(tensor, "as_is")], abstract[param].shape, param, cfg, quant,
                           stacked=False))
            tick()
            continue
        value = dequantize(reader, tensor)
        if param == "final_norm":  # stored as the whole scale (offset + w), as every norm
            value = to_layout(value, "norm", cfg)
        value = value.astype(np_dtype, copy=False)
        if value.shape != abstract[param].shape:
            raise GGUFError(f"{filename}: tensor {tensor.name!r} has shape {value.shape}; "
                            f"the config expects {abstract[param].shape}")
        params[param] = place(value, sharding_at(shardings, param))
        _drop_file_pages(reader)
        tick()
    for param, by_layer in layer_tensors.items():
        if quant and param in CONTRACTION_AXES:
            layers = [by_layer[i] for i in range(cfg.n_layers)]
            shape = abstract["layers"][param].shape[1:]
            params["layers"][param] = jax.device_put(
                _quantized(reader, layers, shape, param, cfg, quant, stacked=True))
            _drop_file_pages(reader)
            for _ in layers:
                tick()
            continue
        stacked = np.empty(abstract["layers"][param].shape, np_dtype)
        for index, (tensor, kind) in by_layer.items():
            value = to_layout(dequantize(reader, tensor), kind, cfg)
            if value.shape != stacked.shape[1:]:
                raise GGUFError(f"{filename}: tensor {tensor.name!r} has shape {value.shape} "
                                f"after conversion; the config expects {stacked.shape[1:]}")
            stacked[index] = value
            tick()
        params["layers"][param] = place(stacked, sharding_at(shardings, "layers", param))
        del stacked  # the host copy goes before the next weight is read
        _drop_file_pages(reader)
    if progress:
        print(file=sys.stderr)
    return params


def _quantized(reader, tensors, layer_shape, param: str, cfg: ModelConfig, quant: str, *,
               stacked: bool):
    """One parameter as a QArray: its per-layer `tensors` stacked when `stacked`."""
    axis = CONTRACTION_AXES[param]
    stored = stored_shape(layer_shape, axis)
    D, H, K = cfg.embed_dim, cfg.n_heads, cfg.n_kv_heads
    rows_order = {
        "q": lambda x: unpermute_rotary(x, H),
        "k": lambda x: unpermute_rotary(x, K),
        "o": lambda x: x.reshape(D, H, -1).transpose(1, 0, 2),
    }
    if quant == "gguf":
        native = [gguf_quant.to_qarray(t, stored, axis, rows_order.get(kind))
                  for t, kind in tensors]
        if all(q is not None for q in native):
            if not stacked:
                return native[0]
            if (joined := gguf_quant.stack(native)) is not None:
                return joined
    precision = "int8" if quant == "gguf" else quant
    layers = []
    for tensor, kind in tensors:
        value = dequantize(reader, tensor)
        value = value if kind == "as_is" else to_layout(value, kind, cfg)
        if value.shape != layer_shape:
            raise GGUFError(f"{reader.data.filename}: tensor {tensor.name!r} has shape "
                            f"{value.shape} after conversion; the config expects {layer_shape}")
        layers.append(quantize(value, precision, axis=axis))
    return gguf_quant.stack(layers) if stacked else layers[0]


def _drop_file_pages(reader: gguf.GGUFReader) -> None:
    """Returns the memory-mapped file pages read so far to the OS page cache: they would
    otherwise stay in this process's resident memory until the reader is closed."""
    mapping = getattr(reader.data, "_mmap", None)
    if mapping is not None and hasattr(mmap, "MADV_DONTNEED"):
        mapping.madvise(mmap.MADV_DONTNEED)


def load_gguf(
    path: str | os.PathLike,
    *,
    dtype: str = "float32",
    mesh: Any = None,
    quant: str | None = None,
    progress: bool = True,
):
    """(ModelConfig, params, reader) from a GGUF file; weights dequantized to `dtype` and,
    given a `jax.sharding.Mesh`, placed on their shardings over it as they are read."""
    reader = open_gguf(path)
    cfg = model_config(reader).with_dtype(dtype)
    shardings = None if mesh is None else param_shardings(cfg, mesh)
    if quant is not None:
        cfg = dataclasses.replace(cfg, quant=quant)
    params = load_params(reader, cfg, shardings=shardings, quant=quant, progress=progress)
    return cfg, params, reader
