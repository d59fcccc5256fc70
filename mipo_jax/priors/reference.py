"""θ-independent priors built from a frozen model: mathematics §2.1–2.5, §2.18, §2.16, §3.5(v).

All are exact MI-DPO mappings with ``alpha`` equal to the original β.
"""

import jax.numpy as jnp

from mipo_jax.priors.base import PRIORS, lengths, reference_seq


@PRIORS.register("reference", needs=("reference",))
def reference(inputs, cfg):
    """DPO (Rafailov et al. 2023, Eq. 7): ζ(y|x) = π_ref(y|x), so log ζ = S^ref."""
    return reference_seq(inputs, "prior 'reference'")


@PRIORS.register("previous_policy", needs=("reference",))
def previous_policy(inputs, cfg):
    """DICE / SPIN (mathematics §2.2, §2.18): ζ = π_{t-1}, the previous round's policy.

    The batch's ``reference`` field holds the previous iterate's log-probs; the trainer's
    round logic decides which model fills it. The loss is DPO's with that reference.
    """
    return reference_seq(inputs, "prior 'previous_policy'")


@PRIORS.register("tempered_reference", needs=("reference",), temperature=1.0)
def tempered_reference(inputs, cfg):
    """H-DPO (Omura et al. 2024; mathematics §2.3): ζ = π_ref^{1/a}, λ_t = ℓ^ref_t / a.

    With ``alpha = a·β`` this is L = −log σ(β(a S^π_w − S^ref_w) − β(a S^π_l − S^ref_l)),
    the H-DPO loss; ``temperature`` is H-DPO's α (a < 1 lowers the policy's entropy).
    """
    return reference_seq(inputs, "prior 'tempered_reference'") / cfg.prior.temperature


@PRIORS.register("length_tilted_reference", needs=("reference",), length_coef=0.0)
def length_tilted_reference(inputs, cfg):
    """R-DPO (Park et al. 2024; mathematics §2.5): ζ = π_ref · exp(−α_R |y| / β).

    Gives the logit β h + α_R (|y_w| − |y_l|) with ``length_coef`` = α_R, |y| in tokens.
    """
    ref = reference_seq(inputs, "prior 'length_tilted_reference'")
    return ref - cfg.prior.length_coef / cfg.alpha * lengths(inputs.mask)


@PRIORS.register("uniform")
def uniform(inputs, cfg):
    """CPO's preference term, SimPO mapping (i) (mathematics §2.16, §2.4): log ζ = 0."""
    return jnp.zeros(inputs.policy.shape[:2], inputs.policy.dtype)


@PRIORS.register("token_uniform", vocab_size=1)
def token_uniform(inputs, cfg):
    """ζ = V^{−|y|} (mathematics §3.5(v)): not SimPO; an R-DPO-type term α log V (|y_w| − |y_l|)."""
    return -jnp.log(float(cfg.prior.vocab_size)) * lengths(inputs.mask)
