"""Pair weightings: a per-pair factor on every link's loss, chosen by ``loss.weighting``.

A weighting is ``weighting(inputs) -> [B]`` (or a scalar), registered in :data:`WEIGHTINGS`
with the batch inputs it needs.
"""

import jax
import jax.numpy as jnp

from mipo_jax.priors import lengths, seq_sum
from mipo_jax.registry import Registry
from mipo_jax.types import TokenInputs

WEIGHTINGS = Registry("weighting")


@WEIGHTINGS.register("none")
def none(inputs: TokenInputs):
    """Every pair counts once."""
    return 1.0


@WEIGHTINGS.register("wpo", needs=("logsumsq",))
def wpo(inputs: TokenInputs) -> jax.Array:
    """WPO (Zhou et al. 2024): w(y_w)·w(y_l), w(y) = exp(mean_t[ℓ^π_t − log Σ_v π²]), no grad."""
    inputs.require("logsumsq", who="weighting 'wpo'")
    n = jnp.maximum(lengths(inputs.mask), 1.0)
    per_seq = seq_sum(inputs.policy - inputs.logsumsq, inputs.mask) / n
    return jax.lax.stop_gradient(jnp.exp(jnp.sum(per_seq, axis=-1)))
