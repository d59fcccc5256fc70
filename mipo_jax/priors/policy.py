"""θ-dependent priors: the gradient flows through ζ (mathematics §1.3, §2.4, §2.6–2.8, §2.12,
§2.15, §2.19, §2.24). Each is exact only with the gradient flowing exactly as written."""

import jax
import jax.numpy as jnp

from mipo_jax.priors.base import PRIORS, lengths, reference_seq, reference_tokens, seq_sum
from mipo_jax.types import CHOSEN


def _policy_seq(inputs):
    return seq_sum(inputs.policy, inputs.mask)


@PRIORS.register("length_normalized", needs=("reference",))
def length_normalized(inputs, cfg):
    """sigmoid_norm (TRL; Tülu-3 length-normalised DPO): log ζ = S^π − ρ/|y|.

    With ``normalize='sum'`` the implicit log-ratio becomes ρ/|y| = (S^π − S^ref)/|y|.
    Equivalent to ``normalize='mean'`` with the 'reference' prior.
    """
    pol = _policy_seq(inputs)
    rho = pol - reference_seq(inputs, "prior 'length_normalized'")
    return pol - rho / jnp.maximum(lengths(inputs.mask), 1.0)


@PRIORS.register("simpo", gamma=0.0)
def simpo(inputs, cfg):
    """SimPO mapping (ii) (Meng et al. 2024, Eq. 6; mathematics §2.4(b)(ii)).

    log ζ(y) = (1 − 1/|y|) S^π(y) ± γ/(2β) (+ on y_w, − on y_l), gradient flowing, so that
    α(S^π − log ζ) = β A(y) ∓ γ/2 and the logit is β(A_w − A_l) − γ. Use ``normalize='sum'``.
    """
    n = jnp.maximum(lengths(inputs.mask), 1.0)
    pol = _policy_seq(inputs)
    sign = jnp.array([1.0, -1.0], pol.dtype)[None, :]
    return (1.0 - 1.0 / n) * pol + sign * cfg.prior.gamma / (2.0 * cfg.alpha)


@PRIORS.register("sequential_kl", needs=("reference", "kl"), kl_coef=1.0, stop_grad_chosen=False)
def sequential_kl(inputs, cfg):
    """TDPO (Zeng et al. 2024; mathematics §2.6): λ_t = ℓ^ref_t − c·KL_t(π_ref ‖ π_θ).

    TDPO1: c = 1 on both sides. TDPO2: c = α_T and ``stop_grad_chosen`` (the chosen side's
    SeqKL is detached, as in the original code's ``.detach()``).
    """
    who = "prior 'sequential_kl'"
    inputs.require("kl", who=who)
    seqkl = seq_sum(inputs.kl, inputs.mask)
    if cfg.prior.stop_grad_chosen:
        seqkl = seqkl.at[:, CHOSEN].set(jax.lax.stop_gradient(seqkl[:, CHOSEN]))
    return reference_seq(inputs, who) - cfg.prior.kl_coef * seqkl


@PRIORS.register("token_weighted", needs=("reference_tokens", "token_weights"))
def token_weighted(inputs, cfg):
    """TIS-DPO (Liu et al. 2025; mathematics §2.7): λ_t = (1 − w_t) ℓ^π_t + w_t ℓ^ref_t.

    So S^π − log ζ = Σ_t w_t (ℓ^π_t − ℓ^ref_t), the weighted log-ratio. Weights are constants.
    """
    who = "prior 'token_weighted'"
    inputs.require("token_weights", who=who)
    w = jax.lax.stop_gradient(inputs.token_weights)
    ref = reference_tokens(inputs, who)
    return seq_sum((1.0 - w) * inputs.policy + w * ref, inputs.mask)


@PRIORS.register("sparse_masks", needs=("reference_tokens", "kl", "mask_u"))
def sparse_masks(inputs, cfg):
    """SparsePO (Christopoulou et al. 2024; mathematics §2.8).

    λ_t = (1 − m^u_t) ℓ^π_t + m^u_t ℓ^ref_t − m^d_t KL_t, gradient flowing into the policy
    and into the masks. ``mask_d=None`` is sparse-common (m^d = m^u). The L1 penalty on
    the masks is the separate ``l1_mask_u``/``l1_mask_d`` term.
    """
    who = "prior 'sparse_masks'"
    inputs.require("mask_u", "kl", who=who)
    mu = inputs.mask_u
    md = mu if inputs.mask_d is None else inputs.mask_d
    ref = reference_tokens(inputs, who)
    return seq_sum((1.0 - mu) * inputs.policy + mu * ref - md * inputs.kl, inputs.mask)


def _ld_coefficients(mask, ld_alpha):
    """c_t = 1 for the first l_p = min(|y_w|, |y_l|) completion tokens, ``ld_alpha`` after."""
    position = jnp.cumsum(mask, axis=-1)  # 1-based index among completion tokens
    l_p = jnp.min(lengths(mask), axis=-1)[:, None, None]
    return jnp.where(position <= l_p, 1.0, ld_alpha).astype(mask.dtype)


@PRIORS.register("length_desensitized", needs=("reference_tokens",), ld_alpha=1.0)
def length_desensitized(inputs, cfg):
    """LD-DPO (Liu et al. 2024; TRL HEAD ``ld_alpha``; mathematics §2.24).

    λ_t = c_t ℓ^ref_t + (1 − c_t) ℓ^π_t, so S^π − log ζ = S̃^π − S̃^ref where tokens past
    l_p = min(|y_w|, |y_l|) count with weight ``ld_alpha``. This is TRL HEAD's choice (both
    policy and reference desensitised); TRL v0.19 applied it to the policy only.
    """
    c = _ld_coefficients(inputs.mask, cfg.prior.ld_alpha)
    ref = reference_tokens(inputs, "prior 'length_desensitized'")
    return seq_sum(c * ref + (1.0 - c) * inputs.policy, inputs.mask)


@PRIORS.register("dpop", needs=("reference",), dpop_lambda=50.0)
def dpop(inputs, cfg):
    """DPOP / Smaug (Pal et al. 2024; mathematics §2.19), label-dependent and θ-dependent.

    log ζ(y_w) = S^ref_w + λ max(0, S^ref_w − S^π_w); log ζ(y_l) = S^ref_l, giving the
    logit β[h − λ max(0, S^ref_w − S^π_w)].
    """
    ref = reference_seq(inputs, "prior 'dpop'")
    penalty = cfg.prior.dpop_lambda * jax.nn.relu(ref[:, CHOSEN] - _policy_seq(inputs)[:, CHOSEN])
    return ref.at[:, CHOSEN].add(penalty)


def log1mexp(x):
    """log(1 − e^x) for x < 0, stable on both sides of −log 2 (Mächler 2012)."""
    return jnp.where(x > -jnp.log(2.0), jnp.log(-jnp.expm1(x)), jnp.log1p(-jnp.exp(x)))


@PRIORS.register("odds")
def odds(inputs, cfg):
    """ORPO's odds-ratio term (Hong et al. 2024; mathematics §2.15), for ``normalize='mean'``.

    log ζ = |y| log(1 − e^{A(y)}) so that (S^π − log ζ)/|y| = A − log(1 − e^A) = log odds(y).
    Use ``alpha = 1`` and weight the link by ORPO's λ; the NLL is the ``sft`` term.
    Empty completions (masked out of the loss anyway) use A = −1 to stay finite.
    """
    n = lengths(inputs.mask)
    avg = jnp.where(n > 0, _policy_seq(inputs) / jnp.maximum(n, 1.0), -1.0)
    return n * log1mexp(avg)


@PRIORS.register("learned", needs=("prior",))
def learned(inputs, cfg):
    """A learnable prior ζ_φ(y): a prompt-free model trained jointly with π (mathematics
    §1.2, §1.5).

    log ζ = Σ_t log ζ_φ(y_t | y_<t) from the batch field ``prior``; the gradient flows into φ.
    Pair it with the ``mi_weight`` term, which pins ζ_φ to the policy's response marginal
    (min_φ KL(p_π ‖ ζ_φ)); without it the joint problem has a manifold of minimisers.
    """
    inputs.require("prior", who="prior 'learned'")
    return seq_sum(inputs.prior, inputs.mask)
