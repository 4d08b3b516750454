"""The public entry points: load a model by name or path, generate, chat."""

from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path

from jax.sharding import Mesh

from jaxinfer.checkpoints import Model, gguf, orbax, safetensors, sources
from jaxinfer.checkpoints import draft as draft_checkpoint
from jaxinfer.config import QUANT_MODES, ModelConfig
from jaxinfer.generate import GenerateResult, generate
from jaxinfer.quant import quantize_params
from jaxinfer.sampling import SamplingParams
from jaxinfer.sharding import make_mesh

__all__ = ["Model", "chat", "load_model"]  # Model lives with the loaders; re-exported here


def load_model(
    name_or_path: str = sources.DEFAULT_MODEL,
    *,
    dtype: str = "auto",
    attention: str = "auto",
    mesh: Mesh | str | None = None,
    quant: str | None = None,
    kv_quant: str | None = None,
    cpu_kernels: str = "int8",
    draft: str | None = None,
    progress: bool = True,
) -> Model:
    """Loads a known model (see `sources.KNOWN_MODELS`), a local .gguf file, a Hugging Face
    model directory (config.json + safetensors + tokenizer.json), or a hub id ("org/name").

    dtype: "auto" (fp32 on CPU, bf16 on accelerators), "float32" or "bfloat16".
    attention: "auto" (Pallas kernels on GPU/TPU, XLA on CPU), "xla" or "pallas" (on CPU:
    the kernels in interpret mode, slow; for checking them).
    mesh: a `jax.sharding.Mesh` or a spec such as "data:2,model:4" ("auto": every device on
    `model`); each weight goes onto its sharding as it is read. None: one device.
    quant: None (float weights), "int8" (per output channel), "int4" (groups of 32), or
    "gguf" (a GGUF file's Q8_0 / Q4_0 / Q4_1 / Q4_K blocks kept as they are).
    kv_quant: None (KV cache in the compute dtype) or "int8" (per-token, per-head scales).
    cpu_kernels: quantized products on CPU through jaxinfer.kernels.cpu with activations
    quantized to int8 per block of 32 ("int8", as llama.cpp), in fp32 ("f32"), or XLA's own
    products ("off"); see ModelConfig.cpu_kernels.
    draft: a directory of draft heads distilled for this model (`python -m
    jaxinfer.launch.distill`), kept as params["draft"] for `speculative_method="draft"`.
    An Orbax checkpoint directory (`python -m jaxinfer.launch.convert`) loads too.
    """
    start = time.perf_counter()
    if quant not in QUANT_MODES:
        raise ValueError(f"quant={quant!r}; allowed: {', '.join(map(str, QUANT_MODES))}")
    if draft is not None and mesh is not None:
        raise ValueError("draft heads run on one device; load them without a mesh (or use "
                         "speculative_method='ngram' under one)")
    if isinstance(mesh, str):
        mesh = make_mesh(None if mesh == "auto" else mesh)
    if orbax.is_checkpoint(name_or_path):
        path = Path(name_or_path)
        model = orbax.load(path, mesh=mesh, dtype=dtype)
        cfg, params = _quantize(model.config, model.params, quant, path)
        model = Model(cfg, params, model.tokenizer)
        fix = "convert it again with python -m jaxinfer.launch.convert"
    else:
        path = sources.resolve(name_or_path)
        loader = safetensors.load_hf if path.is_dir() else gguf.load_gguf
        model = loader(path, dtype=dtype, mesh=mesh, quant=quant, progress=progress)
        fix = "load the weights alone with jaxinfer.checkpoints.safetensors.load_hf"
    if model.tokenizer is None:
        raise ValueError(f"{path}: no tokenizer files (tokenizer.json); {fix}")
    if model.tokenizer.chat_template is None:  # a preset may know the template its file lacks
        model.tokenizer.chat_template = sources.chat_template(name_or_path)
    config = dataclasses.replace(model.config, attention=attention, kv_quant=kv_quant,
                                 cpu_kernels=cpu_kernels)
    if draft is not None:
        heads = draft_checkpoint.load(draft, config)
        model = model._replace(params={**model.params, "draft": heads})
    if progress:
        print(f"loaded {path.name} in {time.perf_counter() - start:.1f}s", file=sys.stderr)
    return model._replace(config=config)


def _quantize(cfg: ModelConfig, params, quant: str | None, path: Path):
    """Quantizes restored float params (an Orbax checkpoint's) after the fact."""
    if quant is None:
        return cfg, params
    if quant == "gguf":
        raise ValueError(f"quant='gguf' keeps a GGUF file's own blocks; {path} is not a GGUF "
                         "file: use int8 or int4")
    return dataclasses.replace(cfg, quant=quant), quantize_params(params, quant)


def chat(
    model: Model,
    messages: str | list[dict[str, str]],
    *,
    max_new_tokens: int = 256,
    sampling: SamplingParams | None = None,
    eager: bool = False,
    speculative_method: str = "none",
    num_speculative_tokens: int = 4,
) -> tuple[str, GenerateResult]:
    """Answers a user message (or a list of chat messages) with the model's chat template.
    `eager`: run without compiling; `speculative_method`, `num_speculative_tokens`:
    speculative decoding (see `generate`)."""
    if isinstance(messages, str):
        messages = [{"role": "user", "content": messages}]
    prompt = model.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    tokens = model.tokenizer.encode(prompt, add_bos=False)  # the template places any BOS
    result = generate(
        model.params,
        [tokens],
        model.config,
        max_new_tokens=max_new_tokens,
        sampling=sampling,
        stop_token_ids=model.tokenizer.stop_ids,
        eager=eager,
        speculative_method=speculative_method,
        num_speculative_tokens=num_speculative_tokens,
    )
    return model.tokenizer.decode(result.tokens[0]), result
