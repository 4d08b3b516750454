"""Hugging Face model directories (config.json + safetensors) -> a `Model`.

    cfg, params, tokenizer = load_hf("path/to/Qwen3-0.6B")  # or a hub id, when online

`config.json` maps to a ModelConfig over the shared family table; weights come from
`model.safetensors` or the shards a `model.safetensors.index.json` names, memory-mapped and
described as a tensor source for `pipeline.assemble`. (The `safetensors` package's numpy
reader has no bfloat16, so the format -- an 8-byte header length, a JSON header, raw
little-endian data -- is read here directly.)
"""

from __future__ import annotations

import dataclasses
import json
import math
import mmap
import os
import re
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

from jaxinfer.checkpoints import pipeline
from jaxinfer.checkpoints.families import quirks
from jaxinfer.checkpoints.model import CheckpointError, Model, OnConfig
from jaxinfer.config import ModelConfig
from jaxinfer.tokenizer import Tokenizer

FILE_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
    "BOOL": np.bool_,
}
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"

# config.json `model_type` -> our architecture name.
MODEL_TYPES = {
    "llama": "llama",
    "mistral": "mistral",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "mixtral": "mixtral",
    "qwen3_moe": "qwen3_moe",
    "gpt_oss": "gpt_oss",
    "gemma3_text": "gemma3",
    "gemma3": "gemma3",  # Gemma3ForConditionalGeneration: its text model only
}

# transformers' defaults for keys a config.json may leave out (multimodal Gemma 3 configs list
# only non-default text_config fields); the family table supplies the rest.
CONFIG_DEFAULTS = {
    "gemma3_text": {
        "vocab_size": 262_208, "rope_theta": 1_000_000.0, "rms_norm_eps": 1e-6,
        "max_position_embeddings": 131_072, "sliding_window": 4096,
        "query_pre_attn_scalar": 256, "head_dim": 256, "num_key_value_heads": 4,
    },
}

# Hugging Face tensor name (per layer, after "model.layers.{i}.") -> (our parameter, layout in
# `pipeline.LAYOUTS` of the stored array, torch order [out, in]).
LAYER_TENSORS = {
    "input_layernorm.weight": ("attn_norm", "vector"),
    "self_attn.q_proj.weight": ("wq", "qkv"),
    "self_attn.k_proj.weight": ("wk", "qkv"),
    "self_attn.v_proj.weight": ("wv", "qkv"),
    "self_attn.q_proj.bias": ("bq", "bias"),
    "self_attn.k_proj.bias": ("bk", "bias"),
    "self_attn.v_proj.bias": ("bv", "bias"),
    "self_attn.q_norm.weight": ("q_norm", "vector"),
    "self_attn.k_norm.weight": ("k_norm", "vector"),
    "self_attn.o_proj.weight": ("wo", "o"),
    "post_attention_layernorm.weight": ("mlp_norm", "vector"),
    "mlp.gate_proj.weight": ("w_gate", "in_out"),
    "mlp.up_proj.weight": ("w_up", "in_out"),
    "mlp.down_proj.weight": ("w_down", "in_out"),
}
# Gemma normalises the block outputs too: its post_attention_layernorm is an output norm.
GEMMA_LAYER_TENSORS = {
    **LAYER_TENSORS,
    "post_attention_layernorm.weight": ("post_attn_norm", "vector"),
    "pre_feedforward_layernorm.weight": ("mlp_norm", "vector"),
    "post_feedforward_layernorm.weight": ("post_mlp_norm", "vector"),
}
# A mixture of experts' MLP (after "model.layers.{i}."): the router, then each expert's
# matrices under "<block>.experts.{j}." (Mixtral's w1/w3/w2, Qwen3-MoE's gate/up/down_proj).
MOE_LAYER_TENSORS = {
    "block_sparse_moe.gate.weight": ("router", "in_out"),
    "mlp.gate.weight": ("router", "in_out"),
}
EXPERT_TENSOR = re.compile(r"(?:block_sparse_moe|mlp)\.experts\.(\d+)\.(\w+)\.weight")
# gpt-oss: its own names; every layer's experts in one tensor stored [experts, in, out], gate
# and up interleaved in the columns of gate_up_proj (pipeline layouts "even_cols", "odd_cols").
GPT_OSS_LAYER_TENSORS = {
    **LAYER_TENSORS,
    "self_attn.o_proj.bias": ("bo", "vector"),
    "self_attn.sinks": ("sinks", "vector"),
    "mlp.router.weight": ("router", "in_out"),
    "mlp.router.bias": ("router_bias", "vector"),
    "mlp.experts.down_proj": ("expert_down", "vector"),
    "mlp.experts.down_proj_bias": ("expert_down_bias", "vector"),
}
GPT_OSS_FUSED = {  # one stored tensor -> (gate's, up's) parameter
    "mlp.experts.gate_up_proj": ("expert_gate", "expert_up"),
    "mlp.experts.gate_up_proj_bias": ("expert_gate_bias", "expert_up_bias"),
}
EXPERT_TENSORS = {
    "w1": "expert_gate", "w3": "expert_up", "w2": "expert_down",
    "gate_proj": "expert_gate", "up_proj": "expert_up", "down_proj": "expert_down",
}
GLOBAL_TENSORS = {
    "model.embed_tokens.weight": "embed",
    "model.norm.weight": "final_norm",
    "lm_head.weight": "lm_head",
}
# Where multimodal checkpoints keep their text model, by transformers version.
TEXT_PREFIXES = {
    "model.language_model.": "model.",
    "language_model.model.": "model.",
    "language_model.lm_head.": "lm_head.",
}
NON_TEXT_PREFIXES = ("vision_tower.", "model.vision_tower.", "multi_modal_projector.",
                     "model.multi_modal_projector.")


# -- config.json -> ModelConfig ------------------------------------------------------------------


def _rope(config: dict, layer_type: str, local_theta: float | None) -> dict:
    """The rope parameters of one layer type, from either config.json spelling: transformers 5's
    `rope_parameters` (per layer type for Gemma 3) or the older `rope_theta` + `rope_scaling`
    (+ Gemma 3's `rope_local_base_freq` for its sliding layers)."""
    if config.get("rope_parameters") is not None:
        params = config["rope_parameters"]
        return dict(params[layer_type]) if layer_type in params else dict(params)
    if layer_type == "sliding_attention":
        return {"rope_type": "default",
                "rope_theta": config.get("rope_local_base_freq", local_theta)}
    params = dict(config.get("rope_scaling") or {})
    params.setdefault("rope_theta", config.get("rope_theta", 10_000.0))
    return params


def _freq_factors(rope: dict, head_dim: int, source: Path) -> tuple[float, ...] | None:
    """Divisors of the rotary frequencies that a rope scaling type amounts to."""
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind == "default":
        return None
    if kind == "linear":  # positions divided by the factor, i.e. every frequency
        return (float(rope["factor"]),) * (head_dim // 2)
    if kind == "llama3":  # transformers' _compute_llama3_parameters, as factors
        inv_freq = 1.0 / rope["rope_theta"] ** (np.arange(0, head_dim, 2) / head_dim)
        factor, low, high = rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"]
        old_len = rope["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        smooth = (old_len / wavelen - low) / (high - low)
        divisor = np.where(wavelen > old_len / low, factor, 1.0)
        medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
        divisor = np.where(medium, 1.0 / ((1 - smooth) / factor + smooth), divisor)
        return tuple(map(float, divisor))
    if kind == "yarn":  # transformers' _compute_yarn_parameters, as factors
        factor, theta = float(rope["factor"]), float(rope["rope_theta"])
        old_len = rope["original_max_position_embeddings"]

        def dim_of(rotations: float) -> float:
            return head_dim * math.log(old_len / (rotations * 2 * math.pi)) / (2 * math.log(theta))

        low, high = dim_of(rope.get("beta_fast") or 32), dim_of(rope.get("beta_slow") or 1)
        if rope.get("truncate", True):
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, head_dim - 1)
        ramp = np.clip((np.arange(head_dim // 2, dtype=np.float32) - low)
                       / (high - low if high != low else 0.001), 0, 1)
        extrapolated = 1 - ramp  # the share of each frequency left unscaled
        return tuple(map(float, 1.0 / ((1 - extrapolated) / factor + extrapolated)))
    raise CheckpointError(f"{source}: rope scaling type {kind!r} is not supported; "
                          "supported: default, linear, llama3, yarn")


def _rope_attention_factor(rope: dict) -> float:
    """YaRN's scale of cos and sin (1 for every other rope type)."""
    if rope.get("rope_type", rope.get("type")) != "yarn":
        return 1.0
    if rope.get("attention_factor") is not None:
        return float(rope["attention_factor"])
    if rope.get("mscale") or rope.get("mscale_all_dim"):
        raise CheckpointError("yarn rope with mscale / mscale_all_dim is not supported")
    factor = float(rope["factor"])
    return 1.0 if factor <= 1 else 0.1 * math.log(factor) + 1.0


def model_config(config: dict, source: str | os.PathLike = "config.json") -> ModelConfig:
    """A Hugging Face `config.json` (as a dict) -> ModelConfig."""
    source = Path(source)
    model_type = config.get("model_type")
    if model_type not in MODEL_TYPES:
        architectures = ", ".join(config.get("architectures") or []) or "none listed"
        raise CheckpointError(
            f"{source}: unsupported model_type {model_type!r} (architectures: {architectures}); "
            f"supported: {', '.join(MODEL_TYPES)}")
    if model_type == "gemma3":
        config = {**config["text_config"], "model_type": "gemma3_text"}
    config = {**CONFIG_DEFAULTS.get(config["model_type"], {}), **config}
    arch = MODEL_TYPES[model_type]
    fam = quirks(arch, source)
    for flag in ("attention_bias", "mlp_bias", "use_bidirectional_attention"):
        if config.get(flag) and not (flag == "attention_bias" and fam.qkv_bias):
            raise CheckpointError(f"{source}: {flag}=true is not supported for {model_type}")
    activations = {"silu": "silu", "gelu_pytorch_tanh": "gelu_tanh"}
    activation = config.get("hidden_activation") or config.get("hidden_act")
    if activation is not None and activation not in activations:
        raise CheckpointError(f"{source}: activation {activation!r} is not supported; "
                              f"supported: {', '.join(activations)}")

    n_layers, embed_dim = int(config["num_hidden_layers"]), int(config["hidden_size"])
    n_heads = int(config["num_attention_heads"])
    head_dim = int(config.get("head_dim") or embed_dim // n_heads)
    window = config.get("sliding_window")
    if arch in ("qwen2", "qwen3", "qwen3_moe") and not config.get("use_sliding_window", False):
        window = None
    layer_types = config.get("layer_types")
    if layer_types is None and fam.sliding_pattern:  # older configs: a pattern of global layers
        pattern = config.get("sliding_window_pattern", fam.sliding_pattern)
        layer_types = dataclasses.replace(fam, sliding_pattern=int(pattern)).layer_types(n_layers)
    if layer_types is not None and window is None:
        layer_types = None  # without a window every layer attends globally anyway
    global_rope = _rope(config, "full_attention", fam.local_rope_theta)
    local_rope = (None if fam.local_rope_theta is None
                  else _rope(config, "sliding_attention", fam.local_rope_theta))
    if local_rope is not None and _freq_factors(local_rope, head_dim, source) is not None:
        raise CheckpointError(f"{source}: rope scaling on sliding layers is not supported")
    scalar = config.get("query_pre_attn_scalar")
    return ModelConfig(
        **_moe_fields(config, fam, source),
        architecture=arch,
        vocab_size=int(config["vocab_size"]),
        embed_dim=embed_dim,
        n_layers=n_layers,
        n_heads=n_heads,
        n_kv_heads=int(config.get("num_key_value_heads") or n_heads),
        head_dim=head_dim,
        mlp_dim=int(config["intermediate_size"]),
        max_seq_len=int(config.get("max_position_embeddings", 4096)),
        rope_theta=float(global_rope["rope_theta"]),
        rope_freq_factors=_freq_factors(global_rope, head_dim, source),
        rope_attention_factor=_rope_attention_factor(global_rope),
        rms_eps=float(config.get("rms_norm_eps", 1e-6)),
        tie_embeddings=bool(config.get("tie_word_embeddings", fam.tied_by_default)),
        mlp_activation=fam.mlp_activation if activation is None else activations[activation],
        sliding_window=None if window is None else int(window),
        layer_types=None if layer_types is None else tuple(layer_types),
        rope_local_theta=None if local_rope is None else float(local_rope["rope_theta"]),
        query_pre_attn_scalar=None if scalar is None else float(scalar),
        # No attn_softcap: transformers' Gemma 3 ignores attn_logit_softcapping (released
        # configs set it null); Gemma 3 caps only the final logits, if at all.
        final_softcap=config.get("final_logit_softcapping"),
        **fam.fields(embed_dim),
    )


def _moe_fields(config: dict, fam, source: Path) -> dict[str, Any]:
    """The ModelConfig fields of a mixture of experts' config.json (none for a dense one)."""
    n_experts = int(config.get("num_local_experts") or config.get("num_experts") or 0)
    if not n_experts:
        return {}
    sparse_step = int(config.get("decoder_sparse_step", 1))
    if sparse_step != 1 or config.get("mlp_only_layers"):
        raise CheckpointError(
            f"{source}: decoder_sparse_step={sparse_step}, mlp_only_layers="
            f"{config.get('mlp_only_layers')}: dense layers between expert layers are not "
            "supported; every layer must be a mixture of experts (decoder_sparse_step=1, "
            "mlp_only_layers=[])")
    alpha = config.get("swiglu_alpha")
    if alpha is not None and not math.isclose(alpha, 1.702):
        raise CheckpointError(f"{source}: swiglu_alpha={alpha} is not supported; supported: "
                              "1.702 (gpt-oss)")
    limit = config.get("swiglu_limit")
    return dict(
        n_experts=n_experts,
        experts_per_token=int(config["num_experts_per_tok"]),
        expert_mlp_dim=int(config.get("moe_intermediate_size") or config["intermediate_size"]),
        router_renormalize=bool(config.get("norm_topk_prob", fam.router_renormalize)),
        router_bias=fam.router_bias,
        expert_bias=fam.expert_bias,
        swiglu_limit=None if limit is None else float(limit),
    )


# -- safetensors files ---------------------------------------------------------------------------


class SafetensorsFile:
    """One memory-mapped .safetensors file: `tensor(name)` is a read-only numpy view."""

    def __init__(self, path: Path):
        self.path = path
        with path.open("rb") as f:
            size = path.stat().st_size
            head = f.read(8)
            header_len = int.from_bytes(head, "little") if len(head) == 8 else -1
            if header_len < 0 or 8 + header_len > size:
                raise CheckpointError(f"{path}: not a safetensors file, or truncated")
            try:
                header = json.loads(f.read(header_len))
            except ValueError as e:
                raise CheckpointError(f"{path}: unreadable safetensors header ({e})") from e
            self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size else b""
        header.pop("__metadata__", None)
        self.entries: dict[str, dict] = header
        self._data_start = 8 + header_len
        for name, entry in header.items():
            end = self._data_start + entry["data_offsets"][1]
            if end > size:
                raise CheckpointError(f"{path}: truncated: tensor {name!r} ends at byte {end:,} "
                                      f"but the file has {size:,} bytes")

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.entries[name]["shape"])

    def tensor(self, name: str) -> np.ndarray:
        entry = self.entries[name]
        if entry["dtype"] not in FILE_DTYPES:
            raise CheckpointError(f"{self.path}: tensor {name!r} has dtype {entry['dtype']}; "
                                  f"supported: {', '.join(FILE_DTYPES)}")
        dtype = np.dtype(FILE_DTYPES[entry["dtype"]])
        start, end = entry["data_offsets"]
        count = (end - start) // dtype.itemsize
        array = np.frombuffer(self._map, dtype, count, self._data_start + start)
        return array.reshape(entry["shape"])

    def release(self) -> None:
        """Returns the file pages read so far to the OS page cache (see GGUFFile.release)."""
        if isinstance(self._map, mmap.mmap) and hasattr(mmap, "MADV_DONTNEED"):
            self._map.madvise(mmap.MADV_DONTNEED)


def weight_files(directory: Path) -> dict[str, list[str]]:
    """File name -> the tensor names it holds, from the shard index or the single file.

    Every shard the index names must exist; a missing one is reported with its tensors.
    """
    index_path = directory / INDEX_FILE
    if index_path.is_file():
        weight_map: dict[str, str] = json.loads(index_path.read_text())["weight_map"]
        files: dict[str, list[str]] = {}
        for tensor, file in weight_map.items():
            files.setdefault(file, []).append(tensor)
        for file, tensors in files.items():
            if not (directory / file).is_file():
                raise CheckpointError(
                    f"{directory / file}: shard missing; {index_path.name} says it holds "
                    f"{len(tensors)} tensors, e.g. {', '.join(sorted(tensors)[:3])}")
        return files
    single = directory / SINGLE_FILE
    if single.is_file():
        return {SINGLE_FILE: list(SafetensorsFile(single).entries)}
    present = sorted(p.name for p in directory.iterdir())[:12]
    raise CheckpointError(f"{directory}: no {SINGLE_FILE} or {INDEX_FILE} (found: {present}); "
                          "only safetensors weights are supported")


def _text_name(name: str) -> str | None:
    """The text model's name for a tensor (None for a multimodal model's vision parts)."""
    if name.startswith(NON_TEXT_PREFIXES):
        return None
    for prefix, replacement in TEXT_PREFIXES.items():
        if name.startswith(prefix):
            return replacement + name[len(prefix):]
    return name


@dataclasses.dataclass
class SafetensorsSource:
    """A model directory's safetensors files as a tensor source for `pipeline.assemble`."""

    directory: Path
    cfg: ModelConfig
    config_name = "config.json"

    def __post_init__(self):
        self.files = {file: (SafetensorsFile(self.directory / file), names)
                      for file, names in sorted(weight_files(self.directory).items())}

    @property
    def name(self) -> str:
        return self.directory.name

    @property
    def tensors(self) -> list[pipeline.StoredTensor]:
        layer_tensors = (GEMMA_LAYER_TENSORS if self.cfg.post_norms else
                         GPT_OSS_LAYER_TENSORS if self.cfg.architecture == "gpt_oss" else
                         LAYER_TENSORS)
        out = []
        for reader, names in self.files.values():
            for stored_name in names:
                if stored_name not in reader.entries:
                    raise CheckpointError(f"{reader.path}: tensor {stored_name!r} is missing "
                                          f"(the index places it in this file)")
                if stored_name.endswith(("_blocks", "_scales")) and ".experts." in stored_name:
                    raise CheckpointError(
                        f"{reader.path}: tensor {stored_name!r} holds MXFP4-quantized experts, "
                        "which jaxinfer does not read yet; save a bf16 copy first "
                        "(transformers: Mxfp4Config(dequantize=True), then save_pretrained)")
                name = _text_name(stored_name)
                if name is None or (name == "lm_head.weight" and self.cfg.tie_embeddings):
                    continue  # a vision tower's weights, or a copy of the tied embedding
                parts = name.split(".", 3)
                expert = None
                if name.startswith("model.layers.") and parts[2].isdigit():
                    (param, layout), layer = layer_tensors.get(parts[3], (None, "vector")), int(
                        parts[2])
                    if self.cfg.architecture == "gpt_oss" and parts[3] in GPT_OSS_FUSED:
                        for param, layout in zip(GPT_OSS_FUSED[parts[3]],
                                                 ("even_cols", "odd_cols"), strict=True):
                            out.append(pipeline.StoredTensor(
                                stored_name, param, layer, layout, reader.shape(stored_name),
                                read=lambda r=reader, n=stored_name: r.tensor(n),
                                origin=str(reader.path)))
                        continue
                    if self.cfg.n_experts and (match := EXPERT_TENSOR.fullmatch(parts[3])):
                        expert, layout = int(match[1]), "in_out"
                        param = EXPERT_TENSORS.get(match[2])
                    elif self.cfg.n_experts and parts[3] in MOE_LAYER_TENSORS:
                        param, layout = MOE_LAYER_TENSORS[parts[3]]
                else:
                    param, layout, layer = GLOBAL_TENSORS.get(name), "vector", None
                out.append(pipeline.StoredTensor(
                    stored_name, param, layer, layout, reader.shape(stored_name),
                    read=lambda r=reader, n=stored_name: r.tensor(n), origin=str(reader.path),
                    expert=expert))
        return out

    def release(self) -> None:
        for reader, _ in self.files.values():
            reader.release()


# -- the directory as a whole --------------------------------------------------------------------


def download(repo_id: str) -> Path:
    """A hub id ("Qwen/Qwen3-0.6B") -> the local snapshot directory (downloaded if needed)."""
    try:
        import huggingface_hub
    except ImportError as e:
        raise CheckpointError(f"{repo_id!r} looks like a hub id, but huggingface_hub is not "
                              "installed; pip install huggingface_hub") from e
    patterns = ["*.json", "*.safetensors", "*.jinja", "tokenizer*"]
    try:
        return Path(huggingface_hub.snapshot_download(repo_id, allow_patterns=patterns))
    except Exception as e:  # offline, gated, or no such repo: say which
        raise CheckpointError(f"could not download {repo_id!r} from the hub "
                              f"({type(e).__name__}: {e})") from e


def load_tokenizer(directory: Path, config: dict | None = None) -> Tokenizer | None:
    """tokenizer.json + tokenizer_config.json, with stop ids from generation_config.json and
    config.json; None when the directory has no tokenizer.json."""
    if not (directory / "tokenizer.json").is_file():
        return None
    tokenizer_config = directory / "tokenizer_config.json"
    stops: list[int] = []
    for name in ("config.json", "generation_config.json"):
        path = directory / name
        data = config if name == "config.json" and config is not None else (
            json.loads(path.read_text()) if path.is_file() else {})
        eos = data.get("eos_token_id")
        stops += eos if isinstance(eos, list) else [] if eos is None else [eos]
    return Tokenizer.from_file(directory / "tokenizer.json",
                               tokenizer_config if tokenizer_config.is_file() else None,
                               extra_stop_ids=stops)


def load_hf(
    path: str | os.PathLike, *, dtype: str = "float32", mesh: Any = None,
    quant: str | None = None, progress: bool = True, on_config: OnConfig | None = None
) -> Model:
    """A `Model` from a model directory (its tokenizer None without tokenizer.json); weights
    cast to `dtype` or quantized ("int8" / "int4") as they are read and, given a
    `jax.sharding.Mesh`, placed on their shardings over it. `on_config(config, tokenizer)`
    is called before any weight is read."""
    directory = Path(path)
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise CheckpointError(f"{directory}: no config.json; not a Hugging Face model directory")
    if quant == "gguf":
        raise CheckpointError(f"quant='gguf' keeps a GGUF file's own blocks; {directory} is not "
                              "a GGUF file: use int8 or int4")
    config = json.loads(config_path.read_text())
    cfg = dataclasses.replace(model_config(config, config_path).with_dtype(dtype), quant=quant)
    tokenizer = load_tokenizer(directory, config)
    if on_config is not None:
        on_config(cfg, tokenizer)
    params = pipeline.assemble(SafetensorsSource(directory, cfg), cfg, mesh=mesh,
                               progress=progress)
    return Model(cfg, params, tokenizer)
