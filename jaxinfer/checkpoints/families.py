"""What each model family fixes whatever the checkpoint format: one table, read by every
format's config mapper (GGUF metadata, config.json).

Adding a family is one entry here plus its tensor names in each format's table.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from jaxinfer.checkpoints.model import CheckpointError


@dataclasses.dataclass(frozen=True)
class Family:
    """A family's quirks as ModelConfig data (see `jaxinfer.config.ModelConfig`)."""

    qkv_bias: bool = False  # biases on the q/k/v projections
    qk_norm: bool = False  # RMSNorm over head_dim of q and k
    norm_offset: float = 0.0  # norms scale by (offset + w)
    scaled_embedding: bool = False  # embeddings times sqrt(embed_dim)
    mlp_activation: str = "silu"  # the default when the checkpoint names none
    post_norms: bool = False  # norms on the attention and MLP outputs
    tied_by_default: bool = False  # tie_word_embeddings when a config leaves it out
    sliding_pattern: int | None = None  # every n-th layer global, the rest sliding
    local_rope_theta: float | None = None  # the sliding layers' rope base when unstated
    # llama.cpp's converter permutes q/k rows for families it runs with interleaved rotary
    # ("NORM" rope); NEOX-style families are stored as they are.
    gguf_qk_permuted: bool = False
    # Mixtures of experts: whether the chosen experts' weights are renormalised when the
    # checkpoint does not say (Qwen3-MoE's norm_topk_prob says).
    router_renormalize: bool = True
    router_bias: bool = False  # a bias on the router logits
    expert_bias: bool = False  # biases on the experts' products
    o_bias: bool = False  # a bias on the attention output projection
    attn_sinks: bool = False  # a learned per-head logit in each attention softmax

    def fields(self, embed_dim: int) -> dict[str, Any]:
        """The ModelConfig fields this family fixes."""
        return dict(
            qkv_bias=self.qkv_bias,
            qk_norm=self.qk_norm,
            norm_offset=self.norm_offset,
            embed_scale=embed_dim**0.5 if self.scaled_embedding else 1.0,
            post_norms=self.post_norms,
            o_bias=self.o_bias,
            attn_sinks=self.attn_sinks,
        )

    def layer_types(self, n_layers: int) -> tuple[str, ...] | None:
        """Per-layer attention kinds by the family's sliding pattern (None: no pattern)."""
        pattern = self.sliding_pattern
        if pattern is None:
            return None
        return tuple("full_attention" if (i + 1) % pattern == 0 else "sliding_attention"
                     for i in range(n_layers))


FAMILIES: dict[str, Family] = {
    "llama": Family(gguf_qk_permuted=True),
    "mistral": Family(gguf_qk_permuted=True),
    "qwen2": Family(qkv_bias=True),
    "qwen3": Family(qk_norm=True),
    "mixtral": Family(gguf_qk_permuted=True),
    "qwen3_moe": Family(qk_norm=True, router_renormalize=False),
    # top-k of the router logits, then a softmax over those k: softmax, top-k, renormalise
    "gpt_oss": Family(qkv_bias=True, o_bias=True, attn_sinks=True, router_bias=True,
                      expert_bias=True),
    "gemma3": Family(qk_norm=True, norm_offset=1.0, scaled_embedding=True,
                     mlp_activation="gelu_tanh", post_norms=True, tied_by_default=True,
                     sliding_pattern=6, local_rope_theta=10_000.0),
}


def quirks(architecture: str, source: object) -> Family:
    """The family of `architecture`; an unknown one names the source and the known ones."""
    if architecture not in FAMILIES:
        raise CheckpointError(f"{source}: unsupported architecture {architecture!r}; "
                              f"supported: {', '.join(FAMILIES)}")
    return FAMILIES[architecture]
