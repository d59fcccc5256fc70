"""TRL 1.16's ``DPOTrainer`` loss and reward metrics, restated in float64 NumPy.

Written from ``trl/trainer/dpo_trainer.py`` of the ``trl==1.16.0`` wheel: ``__init__`` (the
checks on ``f_divergence_type`` and ``use_weighting``) and ``_compute_loss`` (scores, the
loss types, WPO weights, the logged rewards). Nothing here imports ``mipo_jax``;
``tests/losses/test_trl.py`` compares ``mipo_loss`` with it and quotes the lines it follows.

Inputs are per token on the pair axis, ``[B, 2, T]`` (index 0 chosen): TRL's batch holds
the chosen rows, then the rejected rows, and ``chunk(2, dim=0)`` splits them, which is the
pair axis here. Per-token log-probs are zero off the completion (TRL's labels are -100
there), so ``sum(dim=1)`` is the masked sum.
"""

import math

import numpy as np

# DPOTrainer.__init__: "The f-DPO reparameterization leaves a β·log Z(x) term that only
# cancels in the chosen-rejected reward difference, so the other losses have no valid
# f-divergence generalization."
F_DIVERGENCE_LOSS_TYPES = {
    "sigmoid",
    "sigmoid_norm",
    "hinge",
    "ipo",
    "exo_pair",
    "robust",
    "discopop",
    "sft",
}


def log_sigmoid(x):
    return -np.logaddexp(0.0, -x)


def sigmoid(x):
    return np.exp(log_sigmoid(x))


def check(loss_types, f_divergence_type="reverse_kl", use_weighting=False) -> None:
    """``DPOTrainer.__init__``'s checks (``ValueError``, ``NotImplementedError``)."""
    if f_divergence_type != "reverse_kl" and not set(loss_types) <= F_DIVERGENCE_LOSS_TYPES:
        raise ValueError(f"f_divergence_type={f_divergence_type!r} with {loss_types}")
    if use_weighting and any(t in {"aot", "aot_unpaired"} for t in loss_types):
        raise NotImplementedError("WPO-style weighting with aot/aot_unpaired")


def scores(logratios, f_divergence_type, f_alpha=0.5):
    """``chosen_scores``/``rejected_scores`` from the log-ratios (float32's clamp at 80)."""
    if f_divergence_type == "reverse_kl":
        return logratios
    if f_divergence_type == "forward_kl":
        return 1 - np.exp(-logratios)
    if f_divergence_type == "js_divergence":
        return math.log(2) + log_sigmoid(logratios)
    if f_divergence_type == "alpha_divergence":
        if abs(f_alpha - 1.0) < 1e-6:
            return logratios
        t = np.minimum((f_alpha - 1.0) * logratios, 80.0)
        return (np.exp(t) - 1.0) * (1.0 / (f_alpha - 1.0))
    raise ValueError(f_divergence_type)


def _sorted_logistic(a, b, beta, eps):
    delta = np.sort(a) - np.sort(b)
    return -log_sigmoid(beta * delta) * (1 - eps) - log_sigmoid(-beta * delta) * eps


def per_sequence_loss(loss_type, c):
    """One loss type's per-pair loss ``[B]``; ``c`` holds ``_compute_loss``'s locals."""
    beta, eps = c["beta"], c["label_smoothing"]
    d = c["chosen_scores"] - c["rejected_scores"]
    rw, rl = beta * c["chosen_logratios"], beta * c["rejected_logratios"]
    if loss_type == "sigmoid":
        return -log_sigmoid(beta * d)
    if loss_type == "hinge":
        return np.maximum(1 - beta * d, 0.0)
    if loss_type in ("ipo", "sigmoid_norm"):
        delta = c["chosen_scores"] / c["chosen_len"] - c["rejected_scores"] / c["rejected_len"]
        if loss_type == "ipo":
            return (delta - 1 / (2 * beta)) ** 2
        return -log_sigmoid(beta * delta)
    if loss_type == "exo_pair":
        return sigmoid(beta * d) * (log_sigmoid(beta * d) - np.log1p(-eps)) + sigmoid(-beta * d) * (
            log_sigmoid(-beta * d) - np.log(eps)
        )
    if loss_type == "nca_pair":
        return -log_sigmoid(rw) - 0.5 * log_sigmoid(-rw) - 0.5 * log_sigmoid(-rl)
    if loss_type == "robust":
        clean = -(1 - eps) * log_sigmoid(beta * d)
        flipped = -eps * log_sigmoid(-beta * d)
        return (clean - flipped) / (1 - 2 * eps)
    if loss_type == "bco_pair":
        return -log_sigmoid(rw) - log_sigmoid(-rl)
    if loss_type == "sppo_hard":
        return (c["chosen_logratios"] - 0.5 / beta) ** 2 + (
            c["rejected_logratios"] + 0.5 / beta
        ) ** 2
    if loss_type == "aot":
        logratios = c["chosen_logps"] - c["rejected_logps"]
        ref_logratios = c["ref_chosen_logps"] - c["ref_rejected_logps"]
        return _sorted_logistic(logratios, ref_logratios, beta, eps)
    if loss_type == "aot_unpaired":
        return _sorted_logistic(c["chosen_logratios"], c["rejected_logratios"], beta, eps)
    if loss_type == "apo_zero":
        return 1 - sigmoid(rw) + sigmoid(rl)
    if loss_type == "apo_down":
        return sigmoid(rw) + 1 - sigmoid(beta * (c["chosen_logratios"] - c["rejected_logratios"]))
    if loss_type == "discopop":
        logits = d * beta
        modulation = sigmoid(logits / c["discopop_tau"])
        return -log_sigmoid(logits) * (1 - modulation) + np.exp(-logits) * modulation
    if loss_type == "sft":
        mask = c["mask"][:, 0] > 0
        return np.full(mask.shape[0], -np.mean(c["policy"][:, 0][mask]))
    raise ValueError(loss_type)


def compute_loss(
    policy,
    reference,
    mask,
    *,
    loss_types,
    beta,
    loss_weights=None,
    f_divergence_type="reverse_kl",
    f_alpha=0.5,
    label_smoothing=0.0,
    discopop_tau=0.05,
    logsumsq=None,
):
    """TRL's ``(loss, metrics)``: ``logsumsq`` (log Σ_v π², per token) turns on
    ``use_weighting``; metrics are the logged ``rewards/*`` and ``logps/*``."""
    check(loss_types, f_divergence_type, logsumsq is not None)
    if logsumsq is not None and "sft" in loss_types:  # `per_sequence_loss *= ...` writes
        raise RuntimeError("TRL 1.16 fails on sft with use_weighting (in-place on .expand())")
    policy, reference = policy * mask, reference * mask
    logps, ref_logps, lengths = policy.sum(-1), reference.sum(-1), mask.sum(-1)
    logratios = logps - ref_logps
    s = scores(logratios, f_divergence_type, f_alpha)
    c = dict(
        beta=beta,
        label_smoothing=label_smoothing,
        discopop_tau=discopop_tau,
        policy=policy,
        mask=mask,
        chosen_logps=logps[:, 0],
        rejected_logps=logps[:, 1],
        ref_chosen_logps=ref_logps[:, 0],
        ref_rejected_logps=ref_logps[:, 1],
        chosen_logratios=logratios[:, 0],
        rejected_logratios=logratios[:, 1],
        chosen_scores=s[:, 0],
        rejected_scores=s[:, 1],
        chosen_len=np.maximum(lengths[:, 0], 1.0),
        rejected_len=np.maximum(lengths[:, 1], 1.0),
    )
    weights = loss_weights or [1.0] * len(loss_types)
    loss = 0.0
    for loss_type, weight in zip(loss_types, weights, strict=True):
        per_seq = per_sequence_loss(loss_type, c)
        if logsumsq is not None:
            aligned = (policy - logsumsq) * mask
            w = np.exp(aligned.sum(-1) / np.maximum(lengths, 1.0))
            per_seq = per_seq * w[:, 0] * w[:, 1]
        loss += per_seq.mean() * weight
    rw, rl = beta * logratios[:, 0], beta * logratios[:, 1]
    metrics = {
        "rewards/chosen": rw.mean(),
        "rewards/rejected": rl.mean(),
        "rewards/accuracies": (rw > rl).astype(float).mean(),
        "rewards/margins": (rw - rl).mean(),
        "logps/chosen": logps[:, 0].mean(),
        "logps/rejected": logps[:, 1].mean(),
    }
    return loss, metrics
