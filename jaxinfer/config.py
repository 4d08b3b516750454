"""Model configuration: a frozen, hashable dataclass that jit takes as a static argument."""

from __future__ import annotations

import dataclasses
import tomllib
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
CONFIGS_DIR = Path(__file__).resolve().parent.parent / "configs"


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture and numerics of one model; every field is static under jit."""

    architecture: str
    vocab_size: int
    embed_dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    mlp_dim: int
    max_seq_len: int
    rope_theta: float = 10_000.0
    # Per-frequency divisors of the rotary frequencies (Llama 3.1+ "llama3" rope scaling).
    rope_freq_factors: tuple[float, ...] | None = None
    rms_eps: float = 1e-5
    tie_embeddings: bool = True
    param_dtype: str = "float32"  # how weights are stored
    compute_dtype: str = "float32"  # activations and the KV cache; softmax and norms run in fp32
    attention: str = "xla"  # which attention implementation jaxinfer.pallas dispatches to

    def __post_init__(self):
        for name in ("param_dtype", "compute_dtype"):
            if getattr(self, name) not in DTYPES:
                raise ValueError(f"{name}={getattr(self, name)!r}; allowed: {', '.join(DTYPES)}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}"
            )

    @property
    def dtype(self) -> jnp.dtype:
        return DTYPES[self.compute_dtype]

    def with_dtype(self, dtype: str) -> ModelConfig:
        """Same model with weights and activations in `dtype` ("auto": fp32 on CPU, else bf16)."""
        if dtype == "auto":
            dtype = default_dtype()
        return dataclasses.replace(self, param_dtype=dtype, compute_dtype=dtype)


def default_dtype() -> str:
    """fp32 on CPU (XLA:CPU runs bf16 matmuls ~8x slower), bf16 on accelerators."""
    return "float32" if jax.default_backend() == "cpu" else "bfloat16"


def load_preset(name: str) -> dict[str, Any]:
    """Reads `configs/<name>.toml` (or a path to a .toml file) into a dict."""
    path = Path(name) if name.endswith(".toml") else CONFIGS_DIR / f"{name}.toml"
    if not path.is_file():
        known = sorted(p.stem for p in CONFIGS_DIR.glob("*.toml"))
        raise ValueError(f"no preset {name!r} ({path} does not exist); known presets: {known}")
    with path.open("rb") as f:
        return tomllib.load(f)
