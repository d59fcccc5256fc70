"""Per-token quantities from logits: log-probs of targets, entropy, KL, log Σπ².

These are the "naive" forms over full ``[..., T, V]`` logits, in float32 (or float64
under x64) whatever the logits' dtype. They are the ground truth that the chunked,
memory-lean paths must reproduce.

Shape legend: B pairs, T tokens, V vocabulary.
"""

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int


def _f32(x: Array) -> Array:
    """Upcast low-precision floats to float32; keep float32/float64 as they are."""
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def token_logps(logits: Float[Array, "... T V"], targets: Int[Array, "... T"]) -> Array:
    """log softmax(logits)[target] per position: target logit minus an f32 logsumexp."""
    logits = _f32(logits)
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return target_logit - jax.nn.logsumexp(logits, axis=-1)


def token_entropy(logits: Float[Array, "... T V"]) -> Float[Array, "... T"]:
    """Entropy H(π(·|y_<t)) per position."""
    logp = jax.nn.log_softmax(_f32(logits), axis=-1)
    return -jnp.sum(jnp.exp(logp) * logp, axis=-1)


def token_kl(
    ref_logits: Float[Array, "... T V"], logits: Float[Array, "... T V"]
) -> Float[Array, "... T"]:
    """Forward KL(π_ref ‖ π_θ) per position (TDPO's and SparsePO's direction, spec §0.3)."""
    ref_logp = jax.nn.log_softmax(_f32(ref_logits), axis=-1)
    logp = jax.nn.log_softmax(_f32(logits), axis=-1)
    return jnp.sum(jnp.exp(ref_logp) * (ref_logp - logp), axis=-1)


def token_logsumsq(logits: Float[Array, "... T V"]) -> Float[Array, "... T"]:
    """log Σ_v π(v|y_<t)² per position (WPO's weight, spec §2.25)."""
    logp = jax.nn.log_softmax(_f32(logits), axis=-1)
    return jax.nn.logsumexp(2.0 * logp, axis=-1)
