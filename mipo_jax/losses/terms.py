"""Extra terms added to the preference loss (mathematics §2.8, §2.15–2.17, §1.5).

A term is registered in :data:`TERMS` with its weight keys (top-level ``loss.<key>``, default
0) and the batch inputs it needs; it is on when any of its weight keys is non-zero, and terms
are added in registration order. Each is ``term(inputs, cfg, valid, norm) -> (loss, Metric)``:
its contribution to the loss, divided by the global denominator in ``norm`` when given (so
micro-batches add up exactly under gradient accumulation), and its metric ``loss/<name>``
(a sum and its natural denominator).
"""

import jax
import jax.numpy as jnp

from mipo_jax.metrics import Metric
from mipo_jax.registry import Registry
from mipo_jax.types import CHOSEN, TokenInputs

TERMS = Registry("term")


def active(cfg) -> list[str]:
    """The terms that ``cfg`` turns on (a weight key is non-zero), in registration order."""
    return [name for name, entry in TERMS.items() if any(cfg[k] for k in entry.params)]


@TERMS.register("sft", sft_weight=0.0)
def sft(inputs: TokenInputs, cfg, valid, norm) -> tuple[jax.Array, Metric]:
    """NLL of the chosen response, token-mean over the batch (TRL ``sft``, RPO, CPO, ORPO)."""
    m = inputs.mask[:, CHOSEN] * valid[:, None]
    nll = Metric(-jnp.sum(inputs.policy[:, CHOSEN] * m), jnp.sum(m))
    return cfg.sft_weight * nll.total / jnp.maximum(norm.get("sft_tokens", nll.count), 1.0), nll


@TERMS.register("l1_mask", needs=("mask_u",), l1_mask_u=0.0, l1_mask_d=0.0)
def l1_masks(inputs: TokenInputs, cfg, valid, norm) -> tuple[jax.Array, Metric]:
    """SparsePO's λ_u(‖m^u_w‖₁ + ‖m^u_l‖₁) + λ_d(‖m^d_w‖₁ + ‖m^d_l‖₁) per pair, over pairs.

    Norms run over completion tokens. In sparse-common mode (``mask_d is None``) the one
    mask enters both norms, and the original code halves λ_u and λ_d "to make up for double
    adding" (huawei-noah/HEBO SparsePO ``sparse_trainer.py``), so it is penalised with
    (λ_u + λ_d)/2.
    """
    inputs.require("mask_u", who="term 'l1_mask'")
    coef_u, coef_d = cfg.l1_mask_u, cfg.l1_mask_d
    mu = inputs.mask_u
    md = mu if inputs.mask_d is None else inputs.mask_d
    if inputs.mask_d is None:
        coef_u, coef_d = coef_u / 2.0, coef_d / 2.0
    per_pair = coef_u * jnp.sum(jnp.abs(mu) * inputs.mask, axis=(1, 2))
    per_pair += coef_d * jnp.sum(jnp.abs(md) * inputs.mask, axis=(1, 2))
    l1 = Metric(jnp.sum(per_pair * valid), jnp.sum(valid))
    return l1.total / jnp.maximum(norm.get("pairs", jnp.sum(valid)), 1.0), l1


@TERMS.register("mi", needs=("prior_samples", "prior_samples_mask"), mi_weight=0.0)
def mutual_information(inputs: TokenInputs, cfg, valid, norm) -> tuple[jax.Array, Metric]:
    """Cross-entropy of the learnable prior on policy samples: −E_{y∼π} log ζ_φ(y).

    Its φ-gradient equals that of KL(p_π ‖ ζ_φ) = E_x KL(π‖ζ_φ) − I_π(X;Y) (mathematics §1.2), the
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
    mi = Metric(-jnp.sum(w * seq), jnp.sum(w))
    # Sample weights may sum to less than one (exact enumeration), so no clamp at 1.
    return cfg.mi_weight * mi.total / jnp.maximum(norm.get("samples", mi.count), 1e-30), mi
