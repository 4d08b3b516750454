"""Serving: a continuous-batching engine over a paged KV cache, its scheduler, and an
OpenAI-compatible HTTP server (`python -m jaxinfer.launch.serve`)."""

from jaxinfer.serving.config import EngineConfig

__all__ = ["EngineConfig"]
