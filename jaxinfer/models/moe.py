"""The mixture-of-experts MLP (Mixtral, Qwen3-MoE, gpt-oss), beside the dense `gated_mlp`.

A router scores every expert per token (softmax or sigmoid of `x @ router`, plus an optional
bias), keeps the top k, optionally renormalises their weights and scales them; the chosen
experts' gated MLPs (with optional biases and gpt-oss's clamped SwiGLU) run as grouped matrix
products over the tokens sorted by expert, so each expert reads only its own tokens and no
token is dropped (capacity-free). An optional shared expert sees every token.

    weights, experts = route(x, router, bias, cfg)        # [tokens, k] each
    out = routed_experts(x, experts, weights, w_gate, w_up, w_down, activation)

Under a mesh with an `expert` axis each device holds n_experts / expert of the experts and
computes only their share of the assignments; the shares are summed over the mesh
(see `expert_parallel`).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from jaxinfer.config import ModelConfig
from jaxinfer.models.layers import ACTIVATIONS, gated_mlp
from jaxinfer.quant import qarray as quant  # the products only: quantizers sit above
from jaxinfer.sharding import rules

MAX_TILE = 128  # rows per tile of the CPU grouped product: big enough to amortise a weight read


def declarations(cfg: ModelConfig) -> dict[str, tuple[tuple[int, ...], tuple[str | None, ...]]]:
    """name -> (stacked shape, logical axes) of the MoE MLP's per-layer parameters."""
    L, D, E, F = cfg.n_layers, cfg.embed_dim, cfg.n_experts, cfg.expert_mlp_dim
    decl = {
        "router": ((L, D, E), ("layers", "embed", None)),  # small: every device routes
        "expert_gate": ((L, E, D, F), ("layers", "experts", "embed", "mlp")),
        "expert_up": ((L, E, D, F), ("layers", "experts", "embed", "mlp")),
        "expert_down": ((L, E, F, D), ("layers", "experts", "mlp", "embed")),
    }
    if cfg.router_bias:
        decl["router_bias"] = ((L, E), ("layers", None))
    if cfg.expert_bias:
        decl |= {
            "expert_gate_bias": ((L, E, F), ("layers", "experts", "mlp")),
            "expert_up_bias": ((L, E, F), ("layers", "experts", "mlp")),
            "expert_down_bias": ((L, E, D), ("layers", "experts", "embed")),
        }
    if cfg.shared_expert_dim:
        S = cfg.shared_expert_dim
        decl |= {
            "shared_gate": ((L, D, S), ("layers", "embed", "mlp")),
            "shared_up": ((L, D, S), ("layers", "embed", "mlp")),
            "shared_down": ((L, S, D), ("layers", "mlp", "embed")),
        }
    return decl


def route(x: jax.Array, router: jax.Array, bias: jax.Array | None, cfg: ModelConfig
          ) -> tuple[jax.Array, jax.Array]:
    """x [tokens, embed] -> (weights [tokens, k] fp32, experts [tokens, k] int32)."""
    logits = quant.einsum("td,de->te", x, router).astype(jnp.float32)
    if bias is not None:
        logits = logits + bias.astype(jnp.float32)
    if cfg.router_scores == "softmax":
        scores = jax.nn.softmax(logits, axis=-1)
    else:
        scores = jax.nn.sigmoid(logits)
    weights, experts = jax.lax.top_k(scores, cfg.experts_per_token)
    if cfg.router_renormalize:
        weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    return weights * cfg.routed_scale, experts.astype(jnp.int32)


def grouped_matmul(x: jax.Array, w: Any, group_sizes: jax.Array, impl: str = "auto"
                   ) -> jax.Array:
    """x [rows, in] sorted by group, w [groups, in, out] (float or QArray), group_sizes
    [groups] -> [rows, out]: row r times the weight of its group. Rows past the groups' total
    come out zero.

    impl "ragged": `jax.lax.ragged_dot` (XLA's grouped GEMM on GPU/TPU; on CPU it lowers to
    a masked product with every group, so it is not used there). "tiles": the rows cut into
    tiles of one group each, one product per tile in a loop that runs only as many tiles as
    the groups fill (a megablox-style schedule). "auto": ragged on accelerators for float
    weights, tiles otherwise.
    """
    if impl == "auto":
        on_cpu = jax.default_backend() == "cpu"
        impl = "tiles" if on_cpu or isinstance(w, quant.QArray) else "ragged"
    if impl == "ragged":
        return jax.lax.ragged_dot(x, w.astype(x.dtype), group_sizes)
    if impl != "tiles":
        raise ValueError(f"grouped_matmul impl={impl!r}; allowed: auto, ragged, tiles")
    return _tiled_matmul(x, w, group_sizes)


def _tiled_matmul(x: jax.Array, w: Any, group_sizes: jax.Array) -> jax.Array:
    rows, groups = x.shape[0], group_sizes.shape[0]
    tile = min(MAX_TILE, 1 << max(0, (rows // groups).bit_length() - 1))  # ~ rows per group
    group_tiles = (group_sizes + tile - 1) // tile
    tiles_end = jnp.cumsum(group_tiles)
    max_tiles = min(rows, rows // tile + groups)  # a tile holds >= 1 row; <= 1 partial per group
    # Each row's slot in the tile layout, where every group starts on a fresh tile.
    rows_end = jnp.cumsum(group_sizes)
    row = jnp.arange(rows)
    group = jnp.searchsorted(rows_end, row, side="right")  # `groups` for rows past them all
    g = jnp.minimum(group, groups - 1)
    slot = (tiles_end[g] - group_tiles[g]) * tile + row - (rows_end[g] - group_sizes[g])
    slot = jnp.where(group < groups, slot, max_tiles * tile)  # out of range: dropped
    tiled = jnp.zeros((max_tiles * tile, x.shape[1]), x.dtype).at[slot].set(x, mode="drop")
    tiled = tiled.reshape(max_tiles, tile, -1)
    tile_group = jnp.minimum(jnp.searchsorted(tiles_end, jnp.arange(max_tiles), side="right"),
                             groups - 1)

    def one_tile(t, out):
        y = quant.einsum("mk,kn->mn", tiled[t], w[tile_group[t]])
        return jax.lax.dynamic_update_index_in_dim(out, y.astype(out.dtype), t, 0)

    out = jnp.zeros((max_tiles, tile, w.shape[-1]), x.dtype)
    out = jax.lax.fori_loop(0, tiles_end[-1], one_tile, out)  # only the tiles in use
    return jnp.take(out.reshape(max_tiles * tile, -1), slot, axis=0, mode="fill", fill_value=0)


SWIGLU_ALPHA = 1.702  # gpt-oss's sigmoid sharpness: g * sigmoid(1.702 g) approximates GELU


def gated(gate: jax.Array, up: jax.Array, activation: str, swiglu_limit: float | None = None
          ) -> jax.Array:
    """act(gate) * up, or with `swiglu_limit` gpt-oss's clamped form (ModelConfig)."""
    if swiglu_limit is None:
        return ACTIVATIONS[activation](gate) * up
    gate = jnp.minimum(gate, swiglu_limit)
    up = jnp.clip(up, -swiglu_limit, swiglu_limit)
    return (up + 1) * gate * jax.nn.sigmoid(gate * SWIGLU_ALPHA)


def routed_experts(x: jax.Array, experts: jax.Array, weights: jax.Array, w_gate: Any,
                   w_up: Any, w_down: Any, activation: str = "silu", first_expert: Any = 0,
                   impl: str = "auto", biases: tuple[jax.Array, ...] | None = None,
                   swiglu_limit: float | None = None) -> jax.Array:
    """sum_k weights[t, k] * mlp_{experts[t, k]}(x[t]) for x [tokens, embed], over the experts
    held here: w_* [local experts, ...], expert e at index e - first_expert. Assignments to
    experts held elsewhere add nothing. `biases`: each expert's (gate, up, down) biases
    [local experts, width]."""
    n_local, k = w_gate.shape[0], experts.shape[-1]
    local = experts.reshape(-1) - first_expert  # [tokens * k]
    mine = (local >= 0) & (local < n_local)
    key = jnp.where(mine, local, n_local)  # other devices' assignments sort last, in no group
    order = jnp.argsort(key, stable=True)
    group_sizes = jnp.bincount(key, length=n_local + 1)[:n_local].astype(jnp.int32)
    token = order // k
    rows = x[token]  # [tokens * k, embed], grouped by expert
    gate = grouped_matmul(rows, w_gate, group_sizes, impl)
    up = grouped_matmul(rows, w_up, group_sizes, impl)
    if biases is not None:
        row_expert = jnp.minimum(key[order], n_local - 1)  # others' rows: weight 0 below
        gate, up = gate + biases[0][row_expert], up + biases[1][row_expert]
    out = grouped_matmul(gated(gate, up, activation, swiglu_limit), w_down, group_sizes, impl)
    if biases is not None:
        out = out + biases[2][row_expert]
    scale = jnp.where(mine, weights.reshape(-1), 0.0)[order].astype(out.dtype)
    return jnp.zeros_like(x).at[token].add(out * scale[:, None])


def moe_mlp(h: jax.Array, layer: dict[str, Any], cfg: ModelConfig) -> jax.Array:
    """h [batch, seq, embed] -> the MoE MLP's output, same shape."""
    x = h.reshape(-1, h.shape[-1])
    weights, experts = route(x, layer["router"], layer.get("router_bias"), cfg)
    w = [_materialized(layer[name]) for name in ("expert_gate", "expert_up", "expert_down")]
    biases = tuple(layer[f"expert_{n}_bias"] for n in ("gate", "up", "down")) if (
        cfg.expert_bias) else None
    out = expert_parallel(
        lambda x, experts, weights, w_gate, w_up, w_down, first, biases: routed_experts(
            x, experts, weights, w_gate, w_up, w_down, cfg.mlp_activation, first,
            biases=biases, swiglu_limit=cfg.swiglu_limit),
        x, experts, weights, *w, biases=biases, cfg=cfg)
    if cfg.shared_expert_dim:
        out = out + gated_mlp(x, layer["shared_gate"], layer["shared_up"], layer["shared_down"],
                              cfg.mlp_activation)
    return out.reshape(h.shape)


def _materialized(w: Any) -> Any:
    """A CPU-kernel view as its QArray: the tiles index experts, which the kernels do not."""
    return w.materialize() if hasattr(w, "materialize") else w


def expert_parallel(fn, x: jax.Array, experts: jax.Array, weights: jax.Array, w_gate: Any,
                    w_up: Any, w_down: Any, *, biases: tuple[jax.Array, ...] | None = None,
                    cfg: ModelConfig) -> jax.Array:
    """`fn(x, experts, weights, w_gate, w_up, w_down, first_expert, biases)` over the mesh.

    Without a mesh: one call with every expert. Under one: each device runs `fn` on the
    experts it holds (w_* split over `expert` and their hidden axis over `model`) for every
    token, and the partial outputs are summed across the mesh. Tokens are not moved: the
    router runs replicated, so each device already knows which of its experts every token
    chose (the all-gather + local grouped matmul dispatch).
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return fn(x, experts, weights, w_gate, w_up, w_down, 0, biases)
    table = rules.model_rules(cfg, mesh).table
    expert_axis, hidden_axis = table.get("experts"), table.get("mlp")
    split = [a for a in (expert_axis, hidden_axis) if a and mesh.shape.get(a, 1) > 1]
    e_axis = expert_axis if expert_axis in split else None
    f_axis = hidden_axis if hidden_axis in split else None
    P = jax.sharding.PartitionSpec
    up_spec, down_spec = P(e_axis, None, f_axis), P(e_axis, f_axis, None)
    n_local = cfg.n_experts // (mesh.shape[e_axis] if e_axis else 1)

    def local(x, experts, weights, w_gate, w_up, w_down, biases):
        first = jax.lax.axis_index(e_axis) * n_local if e_axis else 0
        if biases is not None and f_axis:  # the down bias once, not once per hidden shard
            biases = (*biases[:2], biases[2] * (jax.lax.axis_index(f_axis) == 0))
        out = fn(x, experts, weights, w_gate, w_up, w_down, first, biases)
        return jax.lax.psum(out, tuple(split)) if split else out

    bias_specs = None if biases is None else (P(e_axis, f_axis), P(e_axis, f_axis), P(e_axis))
    return jax.shard_map(
        local, mesh=mesh,
        in_specs=(P(), P(), P(), up_spec, up_spec, down_spec, bias_specs), out_specs=P(),
        check_vma=False,
    )(x, experts, weights, w_gate, w_up, w_down, biases)

