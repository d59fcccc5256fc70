"""Sharding: the mesh ('data', 'fsdp', 'tensor') and the logical-axis rules table."""

from mipo_jax.sharding.mesh import AXES, fill_sizes, make_mesh
from mipo_jax.sharding.rules import (
    LOGICAL_AXES,
    RULES,
    current_rules,
    logical_to_spec,
    named_sharding,
    shard,
    use_rules,
)

__all__ = [
    "AXES",
    "LOGICAL_AXES",
    "RULES",
    "current_rules",
    "fill_sizes",
    "logical_to_spec",
    "make_mesh",
    "named_sharding",
    "shard",
    "use_rules",
]
