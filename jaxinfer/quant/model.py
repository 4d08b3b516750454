"""Quantizing a model's parameter pytree: which weights, along which axis."""

from __future__ import annotations

from typing import Any

import jax

from jaxinfer.quant.qarray import QArray, check_quant, quantize

# Each matrix's contraction (input) axis in the layouts of jaxinfer.models (negative, so the
# stacked `layers` axis does not count). Norms, biases and other vectors stay in float.
CONTRACTION_AXES = {
    "wq": -3, "wk": -3, "wv": -3,  # [embed, heads, head_dim]
    "wo": -2,  # [heads, head_dim, embed]: quantized along head_dim
    "w_gate": -2, "w_up": -2, "w_down": -2,  # [in, out]
    "expert_gate": -2, "expert_up": -2, "expert_down": -2,  # [experts, in, out]
    "shared_gate": -2, "shared_up": -2, "shared_down": -2,
    "embed": -1, "lm_head": -1,  # [vocab, embed]
}


def quantize_params(params: dict[str, Any], precision: str, group: int | None = None) -> dict:
    """Every matrix of `params` as a QArray (int8 per output channel by default, int4 in
    groups of 32); leaves already quantized stay as they are. Jitted once per weight shape."""
    check_quant(precision, group)
    quantize_jit = jax.jit(quantize, static_argnames=("precision", "axis", "group"))

    def visit(path, leaf):
        name = getattr(path[-1], "key", None)
        if isinstance(leaf, QArray) or name not in CONTRACTION_AXES:
            return leaf
        axis = CONTRACTION_AXES[name]
        check_quant(precision, group, leaf.shape[axis])
        return quantize_jit(leaf, precision=precision, axis=axis, group=group)

    return jax.tree_util.tree_map_with_path(visit, params, is_leaf=lambda x: isinstance(x, QArray))


def param_bytes(params: Any) -> int:
    """Bytes the parameters occupy (quantized values, scales and zeros included)."""
    leaves = jax.tree.leaves(params)
    return sum(x.size * x.dtype.itemsize for x in leaves)


def active_param_bytes(params: Any, experts_per_token: int = 0, n_experts: int = 0) -> int:
    """Bytes one token's forward reads: every parameter, but of a mixture's routed experts
    (`expert_*` weights) only the `experts_per_token` of `n_experts` it is sent to. Equals
    param_bytes for a dense model."""
    routed = param_bytes({k: v for k, v in params.get("layers", {}).items()
                          if k.startswith("expert_")})
    unused = routed - routed * experts_per_token // n_experts if n_experts else 0
    return param_bytes(params) - unused
