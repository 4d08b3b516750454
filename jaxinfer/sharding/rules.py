"""Logical axis names -> mesh axes: the PartitionSpec of every parameter, cache and activation.

Parameters declare logical axes once (`family(arch).logical_axes(cfg)`); this module maps
them onto the mesh through one table, so no PartitionSpec is written next to a matmul. The
models package registers each family's declaration here (`register_family`), so this lower
layer never imports the models.

Attention heads the model axis cannot divide (SmolLM2's 9 query / 3 KV heads on 8 devices,
or n_kv_heads < model-axis size in general) are split along `head_dim` instead, for the
query, key, value and output weights and the KV cache alike. Every device then holds
1/model of the attention weights and of the cache (replicating KV heads would hold the
whole cache on every device); the price is an all-reduce of the attention scores per layer.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxinfer.config import ModelConfig
from jaxinfer.sharding.mesh import OPTIONAL_MESH_AXES

log = logging.getLogger(__name__)

# Logical axis -> mesh axis (None: replicated). Parameters, caches and activations share it.
DEFAULT_RULES: Mapping[str, str | None] = {
    "batch": "data",
    "vocab": "model",
    "heads": "model",
    "kv_heads": "model",
    "mlp": "model",
    "experts": "expert",  # MoE expert weights: expert parallelism
    "head_dim": None,
    "embed": None,
    "layers": None,
    "seq": None,  # activations' token axis
    "cache_len": None,  # positions in the dense KV cache
    "pages": None,  # the paged cache's page pool
    "page_size": None,
    "pages_per_seq": None,
}
HEAD_AXES = ("heads", "kv_heads")  # split along head_dim when the model axis cannot divide them

# Logical axes of the KV caches' fields (dense KVCache and PagedKVCache of jaxinfer/cache.py).
CACHE_AXES: Mapping[str, tuple[str | None, ...]] = {
    "k": ("layers", "batch", "kv_heads", "cache_len", "head_dim"),
    "v": ("layers", "batch", "kv_heads", "cache_len", "head_dim"),
    "k_pages": ("layers", "kv_heads", "pages", "page_size", "head_dim"),
    "v_pages": ("layers", "kv_heads", "pages", "page_size", "head_dim"),
    "page_table": ("batch", "pages_per_seq"),
    # int8 caches' per-token, per-head scales (cfg.kv_quant)
    "k_scale": ("layers", "batch", "kv_heads", "cache_len"),
    "v_scale": ("layers", "batch", "kv_heads", "cache_len"),
    "k_scales": ("layers", "kv_heads", "pages", "page_size"),
    "v_scales": ("layers", "kv_heads", "pages", "page_size"),
}
ACTIVATION_AXES = ("batch", "seq", "embed")  # the residual stream between layers


@dataclasses.dataclass(frozen=True)
class ShardingRules:
    """A rules table resolved for one mesh shape: logical axis -> mesh axis or None."""

    mesh_shape: Mapping[str, int]
    table: Mapping[str, str | None]

    def spec(
        self, axes: Sequence[str | None], shape: Sequence[int], what: str, strict: bool = True
    ) -> PartitionSpec:
        """The PartitionSpec of an array `what` with these logical axes and shape. A dimension
        its mesh axis cannot divide is an error, or with `strict=False` stays unsplit."""
        if len(axes) != len(shape):
            raise ValueError(f"{what}: {len(axes)} logical axes {tuple(axes)} for a "
                             f"{len(shape)}-d shape {tuple(shape)}")
        used: set[str] = set()
        entries: list[str | None] = []
        for name, size in zip(axes, shape, strict=True):
            if name is not None and name not in self.table:
                raise ValueError(f"{what}: unknown logical axis {name!r}; the rules know "
                                 f"{', '.join(self.table)}")
            mesh_axis = self.table.get(name) if name is not None else None
            if mesh_axis is None or mesh_axis in used or self.mesh_shape.get(mesh_axis, 1) == 1:
                entries.append(None)  # a mesh axis shards at most one dimension of an array
                continue
            parts = self.mesh_shape[mesh_axis]
            if size % parts and not strict:
                entries.append(None)
                continue
            if size % parts:
                raise ValueError(
                    f"{what}: dimension {name!r} has size {size}, which mesh axis "
                    f"{mesh_axis!r} of size {parts} cannot divide; choose a mesh whose "
                    f"{mesh_axis!r} size divides {size}")
            used.add(mesh_axis)
            entries.append(mesh_axis)
        while entries and entries[-1] is None:
            entries.pop()
        return PartitionSpec(*entries)


_families: dict[str, Any] = {}  # architecture -> its module (abstract_params, logical_axes)


def register_family(architecture: str, module: Any) -> None:
    """Makes `module.abstract_params(cfg)` and `module.logical_axes(cfg)` the parameter
    declaration of `architecture` (jaxinfer.models registers every family it has)."""
    _families[architecture] = module
    _declaration.cache_clear()


@functools.lru_cache(maxsize=16)
def _declaration(cfg: ModelConfig) -> tuple[Any, Any]:
    """(abstract params, logical axes) of the model; computed outside any mesh context,
    whose axes ("data", "model") would not match the logical names."""
    model = _families.get(cfg.architecture)
    if model is None:
        raise ValueError(f"no parameter declaration for architecture {cfg.architecture!r} "
                         f"(known: {', '.join(_families) or 'none'}); import jaxinfer.models")
    with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((), ())):
        return model.abstract_params(cfg), model.logical_axes(cfg)


def logical_sizes(cfg: ModelConfig) -> dict[str, int]:
    """Size of every logical axis the model's parameters declare ("heads" -> 9, ...)."""
    sizes: dict[str, int] = {}

    def record(abstract, axes) -> None:
        for name, size in zip(axes, abstract.shape, strict=True):
            if name is not None:
                sizes[name] = size

    jax.tree.map(record, *_declaration(cfg))
    return sizes


def model_rules(
    cfg: ModelConfig,
    mesh: Mesh | jax.sharding.AbstractMesh,
    table: Mapping[str, str | None] = DEFAULT_RULES,
) -> ShardingRules:
    """`table` resolved for this model on this mesh: attention heads the model axis cannot
    divide move to head_dim (see the module docstring); anything else indivisible errors."""
    mesh_shape = dict(mesh.shape)
    # A mesh without an optional axis (`expert`) replicates what maps to it.
    unknown = {m for m in table.values() if m is not None} - set(mesh_shape) - set(
        OPTIONAL_MESH_AXES)
    if unknown:
        raise ValueError(f"rules map to mesh axes {sorted(unknown)} that the mesh "
                         f"({', '.join(mesh_shape)}) does not have")
    table = dict(table)
    sizes = logical_sizes(cfg)
    head_axis = table.get("heads")
    parts = mesh_shape.get(head_axis, 1) if head_axis else 1
    uneven = {a: sizes[a] for a in HEAD_AXES if a in sizes and sizes[a] % parts}
    if uneven:
        if sizes["head_dim"] % parts:
            heads = ", ".join(f"{a}={n}" for a, n in uneven.items())
            raise ValueError(
                f"mesh axis {head_axis!r} of size {parts} divides neither the attention heads "
                f"({heads}) nor head_dim={sizes['head_dim']}; choose a {head_axis!r} size "
                "that divides one of them")
        log.info("%s: split along head_dim over %r (%d devices)",
                 ", ".join(f"{a}={n}" for a, n in uneven.items()), head_axis, parts)
        table.update({a: None for a in HEAD_AXES}, head_dim=head_axis)
    return ShardingRules(mesh_shape, table)


def param_specs(cfg: ModelConfig, rules: ShardingRules) -> Any:
    """PartitionSpec of every parameter, in the params pytree's structure."""
    def spec(path, abstract, axes) -> PartitionSpec:
        return rules.spec(tuple(axes), abstract.shape, jax.tree_util.keystr(path, simple=True,
                                                                            separator="."))

    return jax.tree_util.tree_map_with_path(spec, *_declaration(cfg))


def param_shardings(cfg: ModelConfig, mesh: Mesh, table=DEFAULT_RULES) -> Any:
    """NamedSharding of every parameter on `mesh`, in the params pytree's structure."""
    specs = param_specs(cfg, model_rules(cfg, mesh, table))
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs,
                        is_leaf=lambda x: isinstance(x, PartitionSpec))


def cache_specs(cache: Any, rules: ShardingRules) -> Any:
    """PartitionSpecs of a KV cache's fields (dense or paged), in the cache's structure.

    A batch the data axis cannot divide stays unsplit (model_rules already settled heads).
    """

    def spec(path, leaf) -> PartitionSpec:
        field = getattr(path[-1], "name", None) or str(path[-1])
        if field not in CACHE_AXES:
            raise ValueError(f"cache field {field!r} has no sharding rule; known: "
                             f"{', '.join(CACHE_AXES)}")
        return rules.spec(CACHE_AXES[field], leaf.shape, f"cache.{field}", strict=False)

    return jax.tree_util.tree_map_with_path(spec, cache)


def _context_mesh() -> jax.sharding.AbstractMesh | None:
    """The mesh `jax.set_mesh` made current, if it has more than one device."""
    mesh = jax.sharding.get_abstract_mesh()
    return None if mesh.empty or mesh.size == 1 else mesh


def constrain_cache(cache: Any, cfg: ModelConfig) -> Any:
    """Inside jit under a mesh: pins a new KV cache to its sharding (no-op without a mesh)."""
    mesh = _context_mesh()
    if mesh is None:
        return cache
    return jax.lax.with_sharding_constraint(cache, cache_specs(cache, model_rules(cfg, mesh)))


def constrain(x: jax.Array, axes: Sequence[str | None] = ACTIVATION_AXES) -> jax.Array:
    """Inside jit under a mesh: a sharding hint for an activation with these logical axes.

    Dimensions the mesh cannot divide stay unconstrained (a hint, not a placement).
    """
    mesh = _context_mesh()
    if mesh is None:
        return x
    entries = []
    for name, size in zip(axes, x.shape, strict=True):
        mesh_axis = DEFAULT_RULES.get(name) if name else None
        ok = mesh_axis in mesh.shape and size % mesh.shape[mesh_axis] == 0
        entries.append(mesh_axis if ok and mesh_axis not in entries else None)
    return jax.lax.with_sharding_constraint(x, PartitionSpec(*entries))


def place(value: np.ndarray, sharding: jax.sharding.Sharding | None) -> jax.Array:
    """A host array -> a (global) jax.Array with `sharding` (None: the default device); each
    process copies only the slices its own devices hold, so nothing else is materialised."""
    if sharding is None:
        array = jax.device_put(value)
    else:
        array = jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])
    # Wait for the copy: an asynchronous transfer keeps `value` alive, and under load the
    # loader would stage the next weight while this one's host buffer still exists.
    return array.block_until_ready()


def sharding_at(shardings: Any, *path: str) -> jax.sharding.Sharding | None:
    """The sharding at `path` of a params-shaped tree of shardings (None: no tree)."""
    node = shardings
    for key in path:
        node = None if node is None else node[key]
    return node


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Host arrays -> global arrays replicated on every device of `mesh` (multi-host safe)."""
    sharding = NamedSharding(mesh, PartitionSpec())
    return jax.tree.map(lambda x: place(np.asarray(x), sharding), tree)


def mesh_of(params: Any) -> Mesh | None:
    """The mesh the params are placed on (None for single-device or host arrays)."""
    for leaf in jax.tree.leaves(params):
        sharding = getattr(leaf, "sharding", None)
        if isinstance(sharding, NamedSharding) and sharding.mesh.size > 1:
            return sharding.mesh
    return None


def to_host(x: jax.Array) -> np.ndarray:
    """The whole value of a (possibly multi-host) array on this host."""
    if getattr(x, "is_fully_addressable", True):
        return np.asarray(jax.device_get(x))
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def shard_params(params: Any, cfg: ModelConfig, mesh: Mesh) -> Any:
    """Moves params (host or device arrays) onto their shardings on `mesh`."""
    return jax.device_put(params, param_shardings(cfg, mesh))
