"""What the checkpoint stores: typed PRNG keys as key data, abstract targets, config as JSON.

Typed PRNG keys (`jax.random.key`, NNX `Rngs`) are written as their raw `key_data` (uint32
with trailing key dimensions) and their implementation name goes into the checkpoint's
metadata; restoring wraps the data again and checks it against the target's key dtype. The
stored arrays are therefore plain integers any reader understands.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import jax
import ml_collections
from jax.sharding import NamedSharding, PartitionSpec


def is_prng_key(x) -> bool:
    dtype = getattr(x, "dtype", None)
    return dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)


def _paths(tree) -> list[tuple[str, Any]]:
    leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
    return [(jax.tree_util.keystr(path), leaf) for path, leaf in leaves]


def key_impls(tree) -> dict[str, str]:
    """{leaf path: PRNG implementation name} for every typed key in `tree`."""
    return {p: str(jax.random.key_impl(x)) for p, x in _paths(tree) if is_prng_key(x)}


def keys_to_data(tree):
    """`tree` with each typed PRNG key replaced by its key data."""
    return jax.tree.map(lambda x: jax.random.key_data(x) if is_prng_key(x) else x, tree)


def _key_data_struct(x: jax.ShapeDtypeStruct) -> jax.ShapeDtypeStruct:
    data = jax.eval_shape(jax.random.key_data, jax.ShapeDtypeStruct(x.shape, x.dtype))
    sharding = x.sharding
    if isinstance(sharding, NamedSharding):
        trailing = (None,) * (data.ndim - x.ndim)
        sharding = NamedSharding(sharding.mesh, PartitionSpec(*sharding.spec, *trailing))
    return jax.ShapeDtypeStruct(data.shape, data.dtype, sharding=sharding)


def abstract_keys_to_data(abstract):
    """Abstract target whose typed-key leaves become their key data's shape, dtype, sharding."""
    return jax.tree.map(lambda x: _key_data_struct(x) if is_prng_key(x) else x, abstract)


def keys_from_data(restored, abstract, impls: Mapping[str, str]):
    """Wrap the key data in `restored` wherever `abstract` holds a typed key."""
    paths = [p for p, _ in _paths(abstract)]
    flat_abs, treedef = jax.tree.flatten(abstract)
    flat = treedef.flatten_up_to(restored)
    out = []
    for path, target, value in zip(paths, flat_abs, flat, strict=True):
        if is_prng_key(target):
            if path not in impls:
                raise ValueError(f"checkpoint has no PRNG key implementation for {path}")
            value = jax.random.wrap_key_data(value, impl=impls[path])
            if value.dtype != target.dtype:
                raise ValueError(f"{path}: checkpoint key {value.dtype}, target {target.dtype}")
            if value.sharding != target.sharding:  # wrapping keeps the key data's spec
                value = jax.device_put(value, target.sharding)
        out.append(value)
    return treedef.unflatten(out)


def as_abstract(tree):
    """Abstract restore target: every leaf a `jax.ShapeDtypeStruct` carrying a sharding.

    Accepts `jax.eval_shape` output with shardings attached, or concrete `jax.Array`s (their
    shape, dtype and sharding are used).
    """

    def one(path, x):
        if isinstance(x, jax.Array):
            return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
        if isinstance(x, jax.ShapeDtypeStruct) and x.sharding is not None:
            return x
        raise ValueError(
            f"restore target leaf {jax.tree_util.keystr(path)} is {x!r}: give every leaf a "
            "sharding on the current mesh (jax.ShapeDtypeStruct(..., sharding=NamedSharding))"
        )

    return jax.tree_util.tree_map_with_path(one, tree)


def with_shardings(abstract, shardings):
    """Attach `shardings` (a matching pytree of Shardings) to `jax.eval_shape` output."""
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract, shardings
    )


def config_to_json(config) -> Any:
    """A ConfigDict (or mapping) as JSON-able data; values JSON can't hold become strings."""
    if config is None:
        return None
    if isinstance(config, ml_collections.ConfigDict | ml_collections.FrozenConfigDict):
        return json.loads(config.to_json_best_effort(sort_keys=True))
    return json.loads(json.dumps(config, sort_keys=True, default=str))


def config_from_json(data) -> ml_collections.ConfigDict | None:
    """Inverse of `config_to_json` (tuples come back as lists)."""
    return None if data is None else ml_collections.ConfigDict(data)


def config_diff(old, new) -> list[str]:
    """Dotted keys whose JSON values differ between two configs (for a resume warning)."""

    def flat(d, prefix=""):
        if not isinstance(d, dict):
            return {prefix[:-1]: d}
        out = {}
        for k, v in d.items():
            out.update(flat(v, f"{prefix}{k}."))
        return out

    a, b = flat(config_to_json(old) or {}), flat(config_to_json(new) or {})
    return sorted(k for k in a.keys() | b.keys() if a.get(k, "<unset>") != b.get(k, "<unset>"))
