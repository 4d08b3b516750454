"""Model configuration: a frozen, hashable dataclass that jit takes as a static argument."""

from __future__ import annotations

import dataclasses
import tomllib
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

# The same dtypes for host (numpy) arrays, as loaders stage them.
NP_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
ACTIVATIONS = ("silu", "gelu_tanh")
ROUTER_SCORES = ("softmax", "sigmoid")
LAYER_TYPES = ("sliding_attention", "full_attention")
QUANT_MODES = (None, "int8", "int4", "gguf")
CPU_KERNELS = ("int8", "f32", "off")
CONFIGS_DIR = Path(__file__).resolve().parent.parent / "configs"
# jaxinfer.pallas.IMPLEMENTATIONS, named here so that configuration imports no kernels
# (tests/test_layering.py keeps the two equal).
ATTENTION_IMPLS = ("auto", "xla", "pallas", "cpu")


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
    # Family quirks, as data: the one decoder in models/llama.py reads them.
    qkv_bias: bool = False  # biases on the q/k/v projections (Qwen2)
    qk_norm: bool = False  # RMSNorm over head_dim of q and k before rope (Qwen3, Gemma 3)
    norm_offset: float = 0.0  # RMSNorm scales by (norm_offset + w): 1.0 for Gemma's (1 + w)
    embed_scale: float = 1.0  # embeddings multiplied by this (Gemma: sqrt(embed_dim))
    mlp_activation: str = "silu"  # gate activation: "silu" (SwiGLU) or "gelu_tanh" (GeGLU)
    post_norms: bool = False  # RMSNorm on the attention and MLP outputs before the residual add
    sliding_window: int | None = None  # keys within this many positions of the query
    # Per layer "sliding_attention" or "full_attention"; None: all sliding if sliding_window is set.
    layer_types: tuple[str, ...] | None = None
    rope_local_theta: float | None = None  # sliding layers' own unscaled rope base (Gemma 3)
    query_pre_attn_scalar: float | None = None  # scores scaled by its -1/2 power (else head_dim's)
    attn_softcap: float | None = None  # attention scores soft-capped: c * tanh(s / c)
    final_softcap: float | None = None  # final logits soft-capped the same way
    o_bias: bool = False  # a bias on the attention output projection (gpt-oss)
    attn_sinks: bool = False  # a learned per-head logit in each attention softmax (gpt-oss)
    rope_attention_factor: float = 1.0  # cos and sin scaled by this (YaRN's attention factor)
    param_dtype: str = "float32"  # how weights are stored
    compute_dtype: str = "float32"  # activations and the KV cache; softmax and norms run in fp32
    # Attention implementation (jaxinfer.pallas.resolve): "xla" (blocked jnp), "pallas"
    # (kernels; interpreted on CPU), "cpu" (the CPU decode kernel) or "auto" (Pallas on GPU/TPU
    # if head_dim fits; on CPU the kernel unless cpu_kernels is "off"; else XLA).
    attention: str = "auto"
    # How the weights are held: None (floats), "int8" / "int4" (quantized at load) or "gguf"
    # (the file's own Q8_0 / Q4_0 / Q4_1 / Q4_K blocks kept as they are); see jaxinfer.quant.
    quant: str | None = None
    kv_quant: str | None = None  # "int8": KV cache in int8 with per-token, per-head scales
    # Quantized products on CPU through jaxinfer.kernels.cpu: "int8" (activations quantized
    # per block of 32 inside the kernel, as llama.cpp does), "f32" (fp32 activations) or
    # "off" (XLA's own products). Ignored on GPU/TPU and under a multi-device mesh.
    cpu_kernels: str = "int8"
    # Batch-invariant numerics on CPU (as vLLM's VLLM_BATCH_INVARIANT, SGLang's deterministic
    # inference): every quantized product and every attention call, prefill included, runs
    # on the CPU kernels, whose per-row arithmetic never depends on the other rows or the
    # number of tokens, so a request's logits are bitwise the same alone or in any batch.
    # Costs prefill speed (the kernels beat XLA at decode, not at long prefills); needs
    # quantized weights and cpu_kernels on; ignored on GPU/TPU.
    batch_invariant: bool = False
    # Mixture of experts (jaxinfer/models/moe.py): every layer's MLP is `n_experts` gated MLPs
    # of width `expert_mlp_dim`, each token through the `experts_per_token` its router picks.
    n_experts: int = 0  # 0: the dense MLP of width mlp_dim
    experts_per_token: int = 0
    expert_mlp_dim: int = 0
    router_scores: str = "softmax"  # expert scores from the router logits: softmax or sigmoid
    router_renormalize: bool = True  # the chosen experts' weights rescaled to sum to one
    router_bias: bool = False  # a learned bias on the router logits (gpt-oss)
    routed_scale: float = 1.0  # the routed experts' sum scaled by this (DeepSeek)
    shared_expert_dim: int = 0  # width of an always-on shared expert (0: none)
    expert_bias: bool = False  # biases on every expert's gate, up and down products (gpt-oss)
    # gpt-oss's expert activation when set: (clip(up, +-limit) + 1) * g * sigmoid(1.702 g) for
    # g = min(gate, limit), in place of act(gate) * up.
    swiglu_limit: float | None = None

    def __post_init__(self):
        for name in ("param_dtype", "compute_dtype"):
            if getattr(self, name) not in DTYPES:
                raise ValueError(f"{name}={getattr(self, name)!r}; allowed: {', '.join(DTYPES)}")
        if self.attention not in ATTENTION_IMPLS:
            raise ValueError(
                f"attention={self.attention!r}; allowed: {', '.join(ATTENTION_IMPLS)}"
            )
        if self.quant not in QUANT_MODES:
            allowed = ", ".join(str(m) for m in QUANT_MODES)
            raise ValueError(f"quant={self.quant!r}; allowed: {allowed}")
        if self.cpu_kernels not in CPU_KERNELS:
            raise ValueError(f"cpu_kernels={self.cpu_kernels!r}; allowed: {', '.join(CPU_KERNELS)}")
        if self.kv_quant not in (None, "int8"):
            raise ValueError(f"kv_quant={self.kv_quant!r}; allowed: None, int8")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}"
            )
        if self.mlp_activation not in ACTIVATIONS:
            raise ValueError(
                f"mlp_activation={self.mlp_activation!r}; allowed: {', '.join(ACTIVATIONS)}"
            )
        if self.n_experts:
            if not 0 < self.experts_per_token <= self.n_experts or self.expert_mlp_dim <= 0:
                raise ValueError(
                    f"experts_per_token={self.experts_per_token}, expert_mlp_dim="
                    f"{self.expert_mlp_dim} for n_experts={self.n_experts}; a mixture of "
                    "experts needs 1 <= experts_per_token <= n_experts and expert_mlp_dim > 0")
            if self.router_scores not in ROUTER_SCORES:
                raise ValueError(f"router_scores={self.router_scores!r}; "
                                 f"allowed: {', '.join(ROUTER_SCORES)}")
        if self.layer_types is not None:
            if len(self.layer_types) != self.n_layers:
                raise ValueError(f"layer_types has {len(self.layer_types)} entries; "
                                 f"the model has n_layers={self.n_layers}")
            if bad := set(self.layer_types) - set(LAYER_TYPES):
                raise ValueError(
                    f"layer_types has {sorted(bad)}; allowed: {', '.join(LAYER_TYPES)}"
                )

    def layer_windows(self) -> tuple[int | None, ...]:
        """Each layer's attention window (None: global attention)."""
        types = self.layer_types or ("sliding_attention",) * self.n_layers
        return tuple(self.sliding_window if t == "sliding_attention" else None for t in types)

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
