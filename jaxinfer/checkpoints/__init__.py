"""Checkpoints (GGUF, Hugging Face safetensors, Orbax) -> `Model`s.

GGUF and safetensors files are tensor sources for the one loading pipeline
(`pipeline.assemble`); Orbax checkpoints restore straight onto their shardings.
"""

from jaxinfer.checkpoints.model import CheckpointError, Model

__all__ = ["CheckpointError", "Model"]
