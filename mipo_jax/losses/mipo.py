"""The MI-DPO loss (Tutnov et al. 2025, arXiv 2501.01544; mathematics §1):

    L = −log σ( α[log π(y_w|x) − log ζ(y_w)] − α[log π(y_l|x) − log ζ(y_l)] − margin ),

assembled from a config: a prior ζ (``cfg.prior.name``), optional length normalisation
(``cfg.normalize``), an optional f-divergence score, one or more link functions with weights
(``cfg.links``/``cfg.link_weights``; ``sigmoid`` is MI-DPO proper), a pair weighting
(``cfg.weighting``: WPO) and extra terms (``losses.terms``: SFT/NLL, SparsePO's L1 on masks,
the mutual-information term of a learnable prior). Each part is registered with the batch
inputs it needs (``losses.needs`` derives what a config reads). Nothing here branches on an
algorithm's name.

Where TRL 1.16 and the MI-DPO mathematics order things differently, ``cfg.trl_order`` picks:
with ``normalize='mean'`` and an f-divergence score g, TRL's ``ipo`` and ``sigmoid_norm``
take the score of the summed log-ratio and then divide by the length, s = g(ρ)/|y| (the
default, ``trl_order=True``, so TRL users get TRL's numbers), while MI-DPO on the
length-normalised policy π^{1/|y|} scores its log-ratio, s = g(ρ/|y|) (``trl_order=False``).
With g = ρ (``reverse_kl``) or ``normalize='sum'`` both are the same. Metrics follow TRL:
``rewards/*`` are α·ρ on the summed log-ratio whatever the score and normalisation; where the
links' α·s differs from it (``normalize='mean'`` or another score) it is logged beside them
as ``scores/*``.

Everything runs in float32 (float64 under x64) whatever the input dtype. Pairs whose chosen
or rejected completion is empty are excluded from the loss and metrics and counted in
``pairs/empty`` (the data pipeline never emits them; this keeps a stray one from producing
NaN). Padding pairs of a fixed-shape batch are marked with ``TokenInputs.pair_valid``.
"""

from collections.abc import Mapping

import chex
import jax
import jax.numpy as jnp

from mipo_jax.losses import terms
from mipo_jax.losses.fdiv import FDIVS, IDENTITY
from mipo_jax.losses.links import LINKS, Scores
from mipo_jax.losses.weighting import WEIGHTINGS
from mipo_jax.metrics import Metric, weighted_mean
from mipo_jax.priors import PRIORS, lengths, seq_sum
from mipo_jax.types import CHOSEN, REJECTED, TokenInputs, compute_dtype


def _check_shapes(inputs: TokenInputs) -> None:
    chex.assert_rank(inputs.policy, 3)
    if inputs.policy.shape[1] != 2:
        raise ValueError(f"policy log-probs must be [B, 2, T]; got {inputs.policy.shape}")
    chex.assert_equal_shape([inputs.policy, inputs.mask])
    for name in ("kl", "token_weights", "mask_u", "mask_d", "logsumsq", "prior"):
        if getattr(inputs, name) is not None:
            chex.assert_shape(getattr(inputs, name), inputs.policy.shape)


def pair_validity(inputs: TokenInputs) -> tuple[jax.Array, jax.Array]:
    """(valid [B], empty [B]): a pair counts when both completions are non-empty."""
    n = lengths(inputs.mask)
    nonempty = jnp.all(n > 0, axis=-1).astype(n.dtype)
    given = jnp.ones_like(nonempty) if inputs.pair_valid is None else inputs.pair_valid
    given = given.astype(n.dtype)
    return given * nonempty, given * (1.0 - nonempty)


def scores(inputs: TokenInputs, cfg, valid=None) -> Scores:
    """Per-pair policy, prior, log-ratio, score and reward for the configured prior."""
    log_zeta = PRIORS.get(cfg.prior.name).fn(inputs, cfg)
    pol = seq_sum(inputs.policy, inputs.mask)
    rho = pol - log_zeta
    g = FDIVS.get(cfg.f_divergence).fn
    if cfg.normalize == "mean":
        n = jnp.maximum(lengths(inputs.mask), 1.0)
        pol, log_zeta = pol / n, log_zeta / n
        score = g(rho, cfg) / n if cfg.get("trl_order", True) else g(rho / n, cfg)
    else:
        score = g(rho, cfg)
    margin = jnp.asarray(cfg.margin, pol.dtype)
    valid = jnp.ones(pol.shape[:1], pol.dtype) if valid is None else valid
    return Scores(pol, log_zeta, rho, score, cfg.alpha * score, margin, valid)


def mipo_loss(
    inputs: TokenInputs, cfg, *, normalizers: Mapping[str, jax.Array] | None = None
) -> tuple[jax.Array, dict[str, Metric]]:
    """The configured loss and its metrics (sums with denominators, TRL names).

    Args:
      inputs: per-token log-probs and extras on the pair axis ``[B, 2, T]``.
      cfg: the loss config (see ``mipo_jax.losses.config``), validated beforehand.
      normalizers: optional global denominators ``{"pairs", "sft_tokens", "samples"}``
        for gradient accumulation: with them, the losses of micro-batches add up exactly to
        the loss of the whole batch. Default: this batch's own counts.

    Returns:
      ``(loss, metrics)``: the scalar loss to differentiate, and a dict of ``Metric``.
    """
    _check_shapes(inputs)
    inputs = inputs.astype(compute_dtype(inputs.policy))
    valid, empty = pair_validity(inputs)
    s = scores(inputs, cfg, valid)
    pair_w = valid * WEIGHTINGS.get(cfg.weighting).fn(inputs)

    norm = dict(normalizers or {})
    pairs = norm.get("pairs", jnp.sum(valid))
    metrics: dict[str, Metric] = {}
    loss = jnp.zeros((), s.policy.dtype)
    for name, weight in zip(cfg.links, cfg.link_weights, strict=True):
        per_pair = LINKS.get(name).fn(s, cfg)
        per_pair = jnp.where(valid > 0, per_pair, 0.0)  # keep NaN of empty pairs out of grads
        component = Metric(jnp.sum(per_pair * pair_w), jnp.sum(valid))
        loss += weight * component.total / jnp.maximum(pairs, 1.0)
        if len(cfg.links) > 1:
            metrics[f"loss/{name}"] = component
    for name in terms.active(cfg):
        contribution, metrics[f"loss/{name}"] = terms.TERMS.get(name).fn(inputs, cfg, valid, norm)
        loss += contribution

    # "loss" merges exactly across micro-batches given global normalizers (count = this
    # batch's share, summing to 1); without them it is a pair-weighted mean, exact when all
    # terms are pair means (token-mean SFT and the MI term need normalizers to merge exactly).
    if normalizers:
        share = jnp.sum(valid) / jnp.maximum(pairs, 1.0)
        metrics["loss"] = Metric(loss, share.astype(loss.dtype))
    else:
        metrics["loss"] = Metric(loss * jnp.sum(valid), jnp.sum(valid))
    metrics.update(_pair_metrics(inputs, cfg, s, valid, empty))
    return loss, metrics


def _reward_metrics(prefix: str, r, valid) -> dict[str, Metric]:
    return {
        f"{prefix}/chosen": weighted_mean(r[:, CHOSEN], valid),
        f"{prefix}/rejected": weighted_mean(r[:, REJECTED], valid),
        f"{prefix}/margins": weighted_mean(r[:, CHOSEN] - r[:, REJECTED], valid),
        f"{prefix}/accuracies": weighted_mean(
            (r[:, CHOSEN] > r[:, REJECTED]).astype(r.dtype), valid
        ),
    }


def _pair_metrics(inputs, cfg, s: Scores, valid, empty) -> dict[str, Metric]:
    sg = jax.lax.stop_gradient
    logps = sg(seq_sum(inputs.policy, inputs.mask))
    prior = sg(s.prior)
    out = _reward_metrics("rewards", sg(cfg.alpha * s.logratio), valid)  # TRL's β·ρ
    if cfg.normalize == "mean" or cfg.f_divergence != IDENTITY:
        out.update(_reward_metrics("scores", sg(s.rewards), valid))  # what the links read
    out |= {
        "logps/chosen": weighted_mean(logps[:, CHOSEN], valid),
        "logps/rejected": weighted_mean(logps[:, REJECTED], valid),
        "prior/chosen": weighted_mean(prior[:, CHOSEN], valid),
        "prior/rejected": weighted_mean(prior[:, REJECTED], valid),
        "pairs/empty": Metric(jnp.sum(empty), jnp.sum(valid + empty)),
    }
    if inputs.kl is not None:
        seqkl = jax.lax.stop_gradient(seq_sum(inputs.kl, inputs.mask))
        out["seqkl/chosen"] = weighted_mean(seqkl[:, CHOSEN], valid)
        out["seqkl/rejected"] = weighted_mean(seqkl[:, REJECTED], valid)
    return out
