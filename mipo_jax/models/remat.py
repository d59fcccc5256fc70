"""Named rematerialisation policies (`ModelConfig.remat`) for one decoder layer."""

from collections.abc import Callable

import jax

_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
    "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def remat(fn: Callable, name: str, *, prevent_cse: bool = True) -> Callable:
    """`fn` under `jax.checkpoint` with the named policy; 'none' returns `fn` unchanged.

    'full' saves nothing (recompute the layer in the backward pass), 'dots_saveable' keeps
    matmul outputs, 'dots_with_no_batch_dims_saveable' keeps only weight-stationary matmuls.
    """
    if name == "none":
        return fn
    if name not in _POLICIES:
        raise ValueError(f"unknown remat policy {name!r}; choose from none, {', '.join(_POLICIES)}")
    return jax.checkpoint(fn, policy=_POLICIES[name], prevent_cse=prevent_cse)
