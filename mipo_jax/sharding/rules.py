"""Logical axis names and the one table that maps them onto the mesh ('data', 'fsdp', 'tensor').

Models name every parameter and key activation axis with a logical name; nothing else in
the model knows about devices. `RULES` maps a name to mesh axes; a name not in the table is
replicated. Mapping a dimension skips mesh axes already used by an earlier dimension and
stops before a mesh axis whose size does not divide the dimension (so 2 KV heads on a
4-way 'tensor' axis are replicated rather than an error).

Logical names:
  batch     activations' batch dimension                 -> ('data', 'fsdp')
  embed     parameters' model-width dimension (FSDP)     -> 'fsdp'
  heads     query heads (parameters and activations)     -> 'tensor'
  kv_heads  key/value heads                              -> 'tensor'
  mlp       feed-forward width                           -> 'tensor'
  vocab     vocabulary                                   -> 'tensor'
  replicated: seq, act_embed (activations' model width), head_dim, layers, pos

Use: ``with jax.set_mesh(mesh):`` around tracing so `shard` constrains activations; without
a mesh every function here is a no-op. Override the table for a block of code with
``with use_rules(my_rules):``.
"""

import contextlib
import contextvars
import math
from collections.abc import Iterator, Sequence

import jax
from jax.sharding import NamedSharding, PartitionSpec

Rules = tuple[tuple[str, str | tuple[str, ...] | None], ...]

RULES: Rules = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
)
LOGICAL_AXES = frozenset(
    ["batch", "embed", "heads", "kv_heads", "mlp", "vocab"]
    + ["seq", "act_embed", "head_dim", "layers", "pos"]
)

_rules: contextvars.ContextVar[Rules] = contextvars.ContextVar("mipo_rules", default=RULES)


@contextlib.contextmanager
def use_rules(rules: Rules) -> Iterator[None]:
    """Use `rules` instead of `RULES` inside the block (tracing included)."""
    token = _rules.set(tuple(rules))
    try:
        yield
    finally:
        _rules.reset(token)


def current_rules() -> Rules:
    return _rules.get()


def logical_to_spec(
    names: Sequence[str | None], shape: Sequence[int], mesh, rules: Rules | None = None
) -> PartitionSpec:
    """PartitionSpec for an array of `shape` whose axes have logical `names`."""
    if len(names) != len(shape):
        raise ValueError(f"logical names {tuple(names)} do not match shape {tuple(shape)}")
    table = dict(current_rules() if rules is None else rules)
    sizes = dict(zip(mesh.axis_names, mesh.axis_sizes, strict=True))
    used: set[str] = set()
    spec = []
    for name, dim in zip(names, shape, strict=True):
        if name is not None and name not in LOGICAL_AXES and name not in table:
            raise ValueError(f"unknown logical axis name {name!r}")
        target = table.get(name) if name is not None else None
        target = (target,) if isinstance(target, str) else tuple(target or ())
        axes = []
        for axis in target:
            if axis in used or sizes[axis] == 1:
                continue
            if dim % (math.prod(sizes[a] for a in axes) * sizes[axis]):
                break
            axes.append(axis)
        used.update(axes)
        spec.append(None if not axes else axes[0] if len(axes) == 1 else tuple(axes))
    return PartitionSpec(*spec)


def named_sharding(names, shape, mesh, rules: Rules | None = None) -> NamedSharding:
    return NamedSharding(mesh, logical_to_spec(names, shape, mesh, rules))


def shard(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    """Constrain activation `x` to its logical layout on the current mesh (no-op without one)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    return jax.lax.with_sharding_constraint(x, logical_to_spec(names, x.shape, mesh))
