"""Extra terms added to the preference loss (spec §2.8, §2.15–2.17, §1.5).

Each returns a :class:`~mipo_jax.metrics.Metric` (a sum and its natural denominator), so
the trainer can divide by a global denominator under gradient accumulation.
"""

import jax
import jax.numpy as jnp

from mipo_jax.metrics import Metric
from mipo_jax.types import CHOSEN, TokenInputs


def sft(inputs: TokenInputs, valid) -> Metric:
    """NLL of the chosen response, token-mean over the batch (TRL ``sft``, RPO, CPO, ORPO)."""
    m = inputs.mask[:, CHOSEN] * valid[:, None]
    return Metric(-jnp.sum(inputs.policy[:, CHOSEN] * m), jnp.sum(m))


def l1_masks(inputs: TokenInputs, valid, coef_u: float, coef_d: float) -> Metric:
    """SparsePO's λ_u(‖m^u_w‖₁ + ‖m^u_l‖₁) + λ_d(‖m^d_w‖₁ + ‖m^d_l‖₁) per pair, over pairs.

    Norms run over completion tokens. In sparse-common mode (``mask_d is None``) the one
    mask enters both norms, and the original code halves λ_u and λ_d "to make up for double
    adding" (huawei-noah/HEBO SparsePO ``sparse_trainer.py``), so it is penalised with
    (λ_u + λ_d)/2.
    """
    inputs.require("mask_u", who="term 'l1_mask'")
    mu = inputs.mask_u
    md = mu if inputs.mask_d is None else inputs.mask_d
    if inputs.mask_d is None:
        coef_u, coef_d = coef_u / 2.0, coef_d / 2.0
    per_pair = coef_u * jnp.sum(jnp.abs(mu) * inputs.mask, axis=(1, 2))
    per_pair += coef_d * jnp.sum(jnp.abs(md) * inputs.mask, axis=(1, 2))
    return Metric(jnp.sum(per_pair * valid), jnp.sum(valid))


def mutual_information(inputs: TokenInputs) -> Metric:
    """Cross-entropy of the learnable prior on policy samples: −E_{y∼π} log ζ_φ(y).

    Its φ-gradient equals that of KL(p_π ‖ ζ_φ) = E_x KL(π‖ζ_φ) − I_π(X;Y) (spec §1.2), the
    term that pins ζ_φ to the policy's response marginal. Samples come from the trainer
    (``prior_samples``), optionally weighted (``prior_samples_weight``).
    """
    inputs.require("prior_samples", "prior_samples_mask", who="term 'mi'")
    seq = jnp.sum(inputs.prior_samples * inputs.prior_samples_mask, axis=-1)
    w = inputs.prior_samples_weight
    # The weights are sampling weights, constants of the ζ-step: were they differentiated
    # (e.g. w = p_π from an enumeration), the π-gradient would reward piling p_π onto
    # high-ζ responses and joint descent collapses to a one-hot ζ.
    w = jnp.ones_like(seq) if w is None else jax.lax.stop_gradient(w.astype(seq.dtype))
    return Metric(-jnp.sum(w * seq), jnp.sum(w))
