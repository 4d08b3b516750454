"""The public entry points: load a model by name or path, generate, chat."""

from __future__ import annotations

import dataclasses
import time
from typing import Any, NamedTuple

from jaxinfer.checkpoints import gguf, sources
from jaxinfer.config import ModelConfig
from jaxinfer.generate import GenerateResult, generate
from jaxinfer.sampling import SamplingParams
from jaxinfer.tokenizer import Tokenizer


class Model(NamedTuple):
    """What `load_model` returns; unpacks as `config, params, tokenizer = load_model(...)`."""

    config: ModelConfig
    params: Any
    tokenizer: Tokenizer


def load_model(
    name_or_path: str = sources.DEFAULT_MODEL,
    *,
    dtype: str = "auto",
    attention: str = "auto",
    progress: bool = True,
) -> Model:
    """Loads a known model (see `sources.KNOWN_MODELS`) or a local .gguf file.

    dtype: "auto" (fp32 on CPU, bf16 on accelerators), "float32" or "bfloat16".
    attention: "auto" (Pallas kernels on GPU/TPU, XLA on CPU), "xla" or "pallas" (on CPU:
    the kernels in interpret mode, slow; for checking them).
    """
    start = time.perf_counter()
    path = sources.resolve(name_or_path)
    cfg, params, reader = gguf.load_gguf(path, dtype=dtype, progress=progress)
    cfg = dataclasses.replace(cfg, attention=attention)
    tokenizer = Tokenizer.from_gguf(reader)
    if progress:
        print(f"loaded {path.name} in {time.perf_counter() - start:.1f}s")
    return Model(cfg, params, tokenizer)


def chat(
    model: Model,
    messages: str | list[dict[str, str]],
    *,
    max_new_tokens: int = 256,
    sampling: SamplingParams | None = None,
) -> tuple[str, GenerateResult]:
    """Answers a user message (or a list of chat messages) with the model's chat template."""
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
    )
    return model.tokenizer.decode(result.tokens[0]), result
