"""What every checkpoint loader returns, and the one error it raises."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

from jaxinfer.config import ModelConfig
from jaxinfer.tokenizer import Tokenizer


class Model(NamedTuple):
    """A loaded model; unpacks as `config, params, tokenizer = load_model(...)`.

    `tokenizer` is None only from a loader of weights alone (a model directory without
    tokenizer.json, an Orbax checkpoint saved without one).
    """

    config: ModelConfig
    params: Any
    tokenizer: Tokenizer | None


# Called by a loader with the config and tokenizer it will return, before it reads any weight.
OnConfig = Callable[[ModelConfig, Tokenizer | None], None]


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message names the file, the tensor and the
    problem."""
