"""The public entry points: load a model by name or path, generate, chat."""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from jax.sharding import Mesh

from jaxinfer.checkpoints import Model, gguf, orbax, safetensors, sources
from jaxinfer.checkpoints import draft as draft_checkpoint
from jaxinfer.config import QUANT_MODES, ModelConfig
from jaxinfer.generate import PREFILL_CHUNK, GenerateResult, generate
from jaxinfer.models import family
from jaxinfer.progress import line
from jaxinfer.quant import quantize_params
from jaxinfer.sampling import SamplingParams
from jaxinfer.sharding import make_mesh
from jaxinfer.tokenizer import Tokenizer

# Model lives with the loaders; re-exported here.
__all__ = ["Model", "chat", "chat_tokens", "load_model", "weight_shapes"]


def load_model(
    name_or_path: str = sources.DEFAULT_MODEL,
    *,
    dtype: str = "auto",
    attention: str = "auto",
    mesh: Mesh | str | None = None,
    quant: str | None = None,
    kv_quant: str | None = None,
    cpu_kernels: str = "int8",
    batch_invariant: bool = False,
    draft: str | None = None,
    progress: bool = True,
    while_loading: Callable[[ModelConfig, Tokenizer], None] | None = None,
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
    batch_invariant: on CPU, a request's logits bitwise the same alone or in any batch (every
    product and attention call on the kernels, prefill included: slower prefill); see
    ModelConfig.batch_invariant.
    draft: a directory of draft heads distilled for this model (`python -m
    jaxinfer.launch.distill`), kept as params["draft"] for `speculative_method="draft"`.
    An Orbax checkpoint directory (`python -m jaxinfer.launch.convert`) loads too.
    while_loading(config, tokenizer): run on a thread of its own once the checkpoint's config
    and tokenizer are read, while the weights are (the config is the returned model's; with
    `weight_shapes(config)` it can compile programs before the weights exist). load_model
    returns when it has finished too, and raises what it raised.
    """
    start = time.perf_counter()
    if quant not in QUANT_MODES:
        raise ValueError(f"quant={quant!r}; allowed: {', '.join(map(str, QUANT_MODES))}")
    if draft is not None and mesh is not None:
        raise ValueError("draft heads run on one device; load them without a mesh (or use "
                         "speculative_method='ngram' under one)")
    if isinstance(mesh, str):
        mesh = make_mesh(None if mesh == "auto" else mesh)
    is_orbax = orbax.is_checkpoint(name_or_path)
    path = Path(name_or_path) if is_orbax else sources.resolve(name_or_path)
    fix = ("convert it again with python -m jaxinfer.launch.convert" if is_orbax else
           "load the weights alone with jaxinfer.checkpoints.safetensors.load_hf")

    def finish(cfg: ModelConfig, tokenizer: Tokenizer | None) -> ModelConfig:
        """The config and tokenizer as returned; before any weight is read, so a file
        without a tokenizer fails at once."""
        if tokenizer is None:
            raise ValueError(f"{path}: no tokenizer files (tokenizer.json); {fix}")
        if tokenizer.chat_template is None:  # a preset may know the template its file lacks
            tokenizer.chat_template = sources.chat_template(name_or_path)
        if is_orbax and quant is not None:
            cfg = dataclasses.replace(cfg, quant=quant)  # quantized after loading (_quantize)
        return dataclasses.replace(cfg, attention=attention, kv_quant=kv_quant,
                                   cpu_kernels=cpu_kernels, batch_invariant=batch_invariant)

    background = _Background(while_loading)
    on_config = lambda cfg, tokenizer: background.start(finish(cfg, tokenizer), tokenizer)  # noqa: E731
    try:
        if is_orbax:
            model = orbax.load(path, mesh=mesh, dtype=dtype, on_config=on_config)
            cfg, params = _quantize(model.config, model.params, quant, path)
            model = Model(cfg, params, model.tokenizer)
        else:
            loader = safetensors.load_hf if path.is_dir() else gguf.load_gguf
            model = loader(path, dtype=dtype, mesh=mesh, quant=quant, progress=progress,
                           on_config=on_config)
    except BaseException:  # the loader's own error goes first
        background.wait()
        raise
    if progress:
        line(f"loaded {path.name} in {time.perf_counter() - start:.1f}s")
    if (error := background.wait()) is not None:
        raise error
    config = finish(model.config, model.tokenizer)
    if draft is not None:
        model = model._replace(params={**model.params,
                                       "draft": draft_checkpoint.load(draft, config)})
    return model._replace(config=config)


def weight_shapes(cfg: ModelConfig) -> Any:
    """The params pytree `load_model` returns for `cfg`, as jax.ShapeDtypeStructs, where the
    config alone decides it (float weights); None where the file does (quantized weights:
    which blocks a GGUF file's layers keep). Programs compiled on these run on the params
    loaded onto one device (under a mesh, placement is part of what a program is compiled
    for)."""
    if cfg.quant is not None:
        return None
    return family(cfg.architecture).abstract_params(cfg)


class _Background:
    """`work(config, tokenizer)` on a thread of its own from start() to wait(), which
    returns what it raised (nothing to do when `work` is None)."""

    def __init__(self, work: Callable[[ModelConfig, Tokenizer], None] | None):
        self.work, self.thread, self.error = work, None, None

    def start(self, cfg: ModelConfig, tokenizer: Tokenizer) -> None:
        if self.work is None:
            return

        def run() -> None:
            try:
                self.work(cfg, tokenizer)
            except BaseException as e:  # noqa: BLE001 - load_model raises it
                self.error = e

        self.thread = threading.Thread(target=run, name="jaxinfer-while-loading", daemon=True)
        self.thread.start()

    def wait(self) -> BaseException | None:
        if self.thread is not None:
            self.thread.join()
        return self.error


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
    prefill_chunk: int = PREFILL_CHUNK,
) -> tuple[str, GenerateResult]:
    """Answers a user message (or a list of chat messages) with the model's chat template.
    `eager`: run without compiling; `speculative_method`, `num_speculative_tokens`:
    speculative decoding; `prefill_chunk`: prompt tokens per prefill step (see `generate`)."""
    result = generate(
        model.params,
        [chat_tokens(model.tokenizer, messages)],
        model.config,
        max_new_tokens=max_new_tokens,
        sampling=sampling,
        stop_token_ids=model.tokenizer.stop_ids,
        eager=eager,
        speculative_method=speculative_method,
        num_speculative_tokens=num_speculative_tokens,
        prefill_chunk=prefill_chunk,
    )
    return model.tokenizer.decode(result.tokens[0]), result


def chat_tokens(tokenizer: Tokenizer, messages: str | list[dict[str, str]]) -> list[int]:
    """The prompt `chat` generates after: a user message (or chat messages) through the
    tokenizer's chat template, with the assistant's turn opened."""
    if isinstance(messages, str):
        messages = [{"role": "user", "content": messages}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    return tokenizer.encode(prompt, add_bos=False)  # the template places any BOS
