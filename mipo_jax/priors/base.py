"""Shared pieces of every prior: the registry and sequence sums.

A prior is a pure function ``prior(inputs: TokenInputs, cfg) -> log ζ`` returning the
sequence-level prior log-score ``[B, 2]`` for the chosen and rejected responses, where
``cfg`` is the loss config (``cfg.alpha``, ``cfg.prior.<param>``). Token-factorised priors
(mathematics §1.3) build per-token scores λ_t and sum them under the completion mask. Whether ζ
carries a gradient is the prior's business: the loss never wraps it in ``stop_gradient``.

Each prior is registered with the batch inputs it needs, words of
:data:`mipo_jax.types.NEEDS`: ``reference`` (summed reference log-probs suffice: a live
model, a per-token cache or dataset columns), ``reference_tokens`` (per-token ones),
``kl``, ``token_weights``, ``mask_u``, ``prior``... The trainer derives from them what to
compute and which reference modes and extra modules a config needs
(:func:`mipo_jax.losses.requirements`); ``tests/losses/test_needs.py`` checks each
declaration against a trace of the loss.
"""

import jax.numpy as jnp
from jaxtyping import Array, Float

from mipo_jax.registry import Registry
from mipo_jax.types import TokenInputs

PRIORS = Registry("prior")


def seq_sum(x: Float[Array, "B 2 T"], mask: Float[Array, "B 2 T"]) -> Float[Array, "B 2"]:
    """Σ_t m_t x_t."""
    return jnp.sum(x * mask, axis=-1)


def lengths(mask: Float[Array, "B 2 T"]) -> Float[Array, "B 2"]:
    """|y| = Σ_t m_t."""
    return jnp.sum(mask, axis=-1)


def reference_seq(inputs: TokenInputs, who: str) -> Float[Array, "B 2"]:
    """S^ref(y): sums a per-token reference, or passes a sequence-level one through."""
    inputs.require("reference", who=who)
    ref = inputs.reference
    return seq_sum(ref, inputs.mask) if ref.ndim == 3 else ref


def reference_tokens(inputs: TokenInputs, who: str) -> Float[Array, "B 2 T"]:
    """Per-token reference log-probs; a sequence-level reference is rejected with a reason."""
    inputs.require("reference", who=who)
    if inputs.reference.ndim != 3:
        raise ValueError(
            f"{who} needs per-token reference log-probs [B, 2, T]; the batch has sequence-level "
            "ones (precomputed ref_chosen_logps/ref_rejected_logps). Use a live reference or a "
            "per-token reference cache."
        )
    return inputs.reference
