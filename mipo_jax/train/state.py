"""The train state and where its pieces live on the mesh.

Parameters are pure nested dicts (``nnx.split`` then ``to_pure_dict``) so the state is a
plain pytree for ``jit``, donation and orbax. Shardings come from the logical axis names
the models put on every parameter (``out_sharding`` metadata) through the one rules table
of :mod:`mipo_jax.sharding`; optimiser moments inherit their parameter's sharding.
"""

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct
from jax.sharding import NamedSharding, PartitionSpec

from mipo_jax.sharding import named_sharding


@struct.dataclass
class TrainState:
    """Everything that is trained or checkpointed (the live reference is neither).

    ``params`` maps a module name (``policy``, and ``mask_net`` or ``prior`` where the
    algorithm has them) to its pure parameter dict. ``aux`` holds models that change during
    the run without a gradient and so must be checkpointed: TR-DPO's moving reference, the
    previous round's policy of DICE/SPIN (key ``reference``: the step reads it instead of
    the frozen reference argument). ``rng`` is raw key data (uint32). ``nonfinite`` counts
    consecutive skipped steps, ``skipped`` all of them.
    """

    step: jax.Array
    params: dict
    opt_state: Any
    rng: jax.Array
    nonfinite: jax.Array
    skipped: jax.Array
    aux: dict = struct.field(default_factory=dict)


def init_state(params: dict, tx: optax.GradientTransformation, seed: int, aux=None) -> TrainState:
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=tx.init(params),
        rng=jax.random.key_data(jax.random.key(seed)),
        nonfinite=jnp.zeros((), jnp.int32),
        skipped=jnp.zeros((), jnp.int32),
        aux=dict(aux or {}),
    )


def replicated(mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def param_shardings(state: nnx.State, mesh) -> dict:
    """Pure dict of ``NamedSharding`` from each Variable's logical names (replicated if none)."""
    out: dict = {}
    for path, var in nnx.to_flat_state(state):
        names = var.get_metadata().get("out_sharding")
        shape = var.shape
        sharding = named_sharding(names, shape, mesh) if names else replicated(mesh)
        node = out
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = sharding
    return out


def create_params(make: Callable[[], nnx.Module], mesh) -> tuple[Any, dict, dict]:
    """``(graphdef, params, shardings)``: a module built directly into its sharded layout."""
    graphdef, abstract = nnx.split(nnx.eval_shape(make))
    shardings = param_shardings(abstract, mesh)

    def build():
        return nnx.to_pure_dict(nnx.split(make())[1])

    if mesh.size == 1:  # eager: no compilation (small models, tests, single device)
        return graphdef, jax.device_put(build(), shardings), shardings
    with jax.set_mesh(mesh):  # straight into the sharded layout, never whole on one device
        params = jax.jit(build, out_shardings=shardings)()
    return graphdef, params, shardings


def state_shardings(state: TrainState, tx, params_sharding: dict, mesh, aux=None) -> TrainState:
    """Shardings of a (possibly abstract) state: optimiser moments follow their parameter."""
    rep = replicated(mesh)
    opt = optax.tree_map_params(
        tx,
        lambda _, s: s,
        state.opt_state,
        params_sharding,
        transform_non_params=lambda _: rep,
        is_leaf=lambda x: isinstance(x, NamedSharding),
    )
    return TrainState(
        step=rep,
        params=params_sharding,
        opt_state=opt,
        rng=rep,
        nonfinite=rep,
        skipped=rep,
        aux=dict(aux or {}),
    )


def abstract(tree, shardings):
    """``ShapeDtypeStruct``s carrying ``shardings`` (restore targets, AOT compilation)."""
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings
    )
