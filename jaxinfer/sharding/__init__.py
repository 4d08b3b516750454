"""Named device meshes, multi-host start-up, and logical-axis sharding rules."""

from jaxinfer.sharding.mesh import (
    MESH_AXES,
    describe,
    initialize_distributed,
    make_mesh,
    parse_mesh_spec,
)
from jaxinfer.sharding.rules import (
    DEFAULT_RULES,
    ShardingRules,
    cache_specs,
    constrain,
    constrain_cache,
    mesh_of,
    model_rules,
    param_shardings,
    param_specs,
    shard_params,
    to_host,
)

__all__ = [
    "DEFAULT_RULES",
    "MESH_AXES",
    "ShardingRules",
    "cache_specs",
    "constrain",
    "constrain_cache",
    "describe",
    "initialize_distributed",
    "make_mesh",
    "mesh_of",
    "model_rules",
    "param_shardings",
    "param_specs",
    "parse_mesh_spec",
    "shard_params",
    "to_host",
]
