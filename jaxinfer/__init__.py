"""jaxinfer: a JAX/XLA compiled inference engine for large language models."""

from jaxinfer.api import Model, chat, load_model
from jaxinfer.config import ModelConfig
from jaxinfer.generate import GenerateResult, generate
from jaxinfer.sampling import SamplingParams

__all__ = [
    "GenerateResult",
    "Model",
    "ModelConfig",
    "SamplingParams",
    "chat",
    "generate",
    "load_model",
]
