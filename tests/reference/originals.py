"""Every algorithm's ORIGINAL loss, in float64 NumPy, written from mathematics §2 in its own form.

Nothing here goes through a prior and nothing imports ``mipo_jax``: these are the formulas as
the papers and their reference code write them, so that
``tests/losses/test_equivalence.py`` can check that MI-DPO with the mapped prior reproduces them.

Inputs (any leading axes ``...`` are carried through, which is how
:func:`tests.reference.complex_step.grad` evaluates all perturbations in one call):

* ``Lp``, ``Lr``: policy and reference logits ``[..., B, 2, T, V]``; ``Lprev`` (DICE/SPIN):
  logits of the previous iterate π_{t-1}.
* ``y``: token ids ``[B, 2, T]``; ``m``: completion masks ``[B, 2, T]`` (1 on completion
  tokens, 0 on prompt and padding). Pair axis: index 0 chosen y_w, 1 rejected y_l.
* Per-algorithm extras: TIS-DPO token weights ``w``; SparsePO masks ``mu`` (m^u) and ``md``
  (m^d), which are differentiable inputs (``[..., B, 2, T]``).

Every function returns the batch loss ``[...]``: the mean of the per-pair losses over B (TRL's
``losses.mean()``), plus any token-mean NLL term as the original code forms it.

Complex-step safety: everything is an analytic function of its inputs (exp/log forms, no
``abs``, no ``np.logaddexp``, no conjugation); comparisons and sorts look at ``.real`` only.
A ``.detach()``/``torch.no_grad()`` of the original code is :func:`sg`, which drops the
imaginary part, i.e. the complex-step derivative.
"""

import numpy as np

W, L = 0, 1  # pair axis: chosen, rejected

# ------------------------------------------------------------------------------------------
# Complex-step-safe primitives
# ------------------------------------------------------------------------------------------


def sg(x):
    """Stop-gradient: the real part (the complex-step derivative of ``x.real`` is zero)."""
    return np.real(x) if np.iscomplexobj(x) else x


def log_softmax(logits):
    shift = np.max(np.real(logits), axis=-1, keepdims=True)  # a constant: cancels exactly
    z = logits - shift
    return z - np.log(np.sum(np.exp(z), axis=-1, keepdims=True))


def log_sigmoid(z):
    """log σ(z) = −log(1 + e^{−z}), evaluated on the side where the exponent is ≤ 0."""
    pos = np.real(z) >= 0
    t = np.log1p(np.exp(np.where(pos, -z, z)))
    return np.where(pos, -t, z - t)


def sigmoid(z):
    return np.exp(log_sigmoid(z))


def relu(x):
    """max(0, x)."""
    return np.where(np.real(x) > 0, x, 0.0)


def l1_norm(x, axis=-1):
    """Σ |x|, with |x| = ±x chosen by the sign of the real part."""
    return np.sum(np.where(np.real(x) >= 0, x, -x), axis=axis)


def sort_batch(x):
    """``torch.sort(x, dim=0)`` on the batch axis (the last axis of ``[..., B]``)."""
    order = np.argsort(np.real(x), axis=-1, kind="stable")
    return np.take_along_axis(x, order, axis=-1)


def batch_mean(per_pair):
    """``losses.mean()`` over the B pairs."""
    return np.mean(per_pair, axis=-1)


# ------------------------------------------------------------------------------------------
# Per-token and per-sequence quantities (mathematics §0.3)
# ------------------------------------------------------------------------------------------


def token_logps(logits, y):
    """ℓ_t = log π(y_t | x, y_<t): log-softmax gathered at the target ids."""
    logp = log_softmax(logits)
    idx = np.broadcast_to(y[..., None], logp.shape[:-1] + (1,))
    return np.take_along_axis(logp, idx, axis=-1)[..., 0]


def token_forward_kl(ref_logits, logits):
    """KL_t = Σ_v π_ref(v)[log π_ref(v) − log π_θ(v)] (TDPO's ``per_position_kl``)."""
    logq, logp = log_softmax(ref_logits), log_softmax(logits)
    return np.sum(np.exp(logq) * (logq - logp), axis=-1)


def seqsum(x, m):
    """Σ_t m_t x_t over the token axis: ``[..., B, 2, T] -> [..., B, 2]``."""
    return np.sum(x * m, axis=-1)


def lengths(m):
    """|y| = Σ_t m_t, ``[B, 2]``."""
    return np.sum(m, axis=-1)


def S(logits, y, m):
    """Summed log-prob S(y) = log π(y|x) of each response, ``[..., B, 2]``."""
    return seqsum(token_logps(logits, y), m)


def dpo_h(Lp, Lr, y, m):
    """h = (S^π_w − S^ref_w) − (S^π_l − S^ref_l)."""
    rho = S(Lp, y, m) - S(Lr, y, m)
    return rho[..., W] - rho[..., L]


def chosen_nll(Lp, y, m):
    """Token-mean cross-entropy over all chosen tokens of the batch (``nn.CrossEntropyLoss``
    with ignored padding, as TRL's RPO/CPO/ORPO/``sft`` form it)."""
    lp = token_logps(Lp, y)[..., W, :]
    mw = m[..., W, :]
    return -np.sum(lp * mw, axis=(-2, -1)) / np.sum(mw)


# ------------------------------------------------------------------------------------------
# MI-DPO's eight (mathematics §2.1–2.8) and the other exact fits (§2.15–2.19, §2.24)
# ------------------------------------------------------------------------------------------


def dpo(Lp, Lr, y, m, *, beta):
    """DPO (Rafailov et al. 2023, Eq. 7): −log σ(β h), summed log-probs."""
    return batch_mean(-log_sigmoid(beta * dpo_h(Lp, Lr, y, m)))


def dice_round(Lp, Lprev, y, m, *, beta):
    """DICE, one round (Chen et al. 2024; sail-sg/dice): standard DPO whose reference is the
    round's starting model π_{t−1} (logits ``Lprev``), on the round's self-labelled pairs."""
    rho = S(Lp, y, m) - S(Lprev, y, m)
    return batch_mean(-log_sigmoid(beta * (rho[..., W] - rho[..., L])))


def spin(Lp, Lprev, y, m, *, lam):
    """SPIN (Chen et al. 2024, arXiv 2401.01335): ℓ(λ log π_θ(y|x)/π_t(y|x) − λ log
    π_θ(y'|x)/π_t(y'|x)) with ℓ(u) = log(1 + e^{−u}); y from the SFT data (index 0), y' from
    the previous iterate π_t (index 1)."""
    log_ratio = S(Lp, y, m) - S(Lprev, y, m)
    u = lam * log_ratio[..., W] - lam * log_ratio[..., L]
    return batch_mean(np.log1p(np.exp(-u)))


def hdpo(Lp, Lr, y, m, *, beta, a):
    """H-DPO (Omura et al. 2024; mathematics §2.3):
    −log σ(β(a S^π_w − S^ref_w) − β(a S^π_l − S^ref_l))."""
    sp, sr = S(Lp, y, m), S(Lr, y, m)
    z = beta * (a * sp[..., W] - sr[..., W]) - beta * (a * sp[..., L] - sr[..., L])
    return batch_mean(-log_sigmoid(z))


def simpo(Lp, y, m, *, beta, gamma):
    """SimPO (Meng et al. 2024, Eq. 6): −log σ((β/|y_w|) S^π_w − (β/|y_l|) S^π_l − γ).
    No reference model; γ = β·gamma_beta_ratio in the code."""
    sp, n = S(Lp, y, m), lengths(m)
    z = beta / n[..., W] * sp[..., W] - beta / n[..., L] * sp[..., L] - gamma
    return batch_mean(-log_sigmoid(z))


def rdpo(Lp, Lr, y, m, *, beta, alpha):
    """R-DPO (Park et al. 2024; mathematics §2.5): −log σ(β h + α(|y_w| − |y_l|)), |y| in tokens."""
    n = lengths(m)
    return batch_mean(-log_sigmoid(beta * dpo_h(Lp, Lr, y, m) + alpha * (n[..., W] - n[..., L])))


def tdpo_from_parts(margin_w, margin_l, kl_w, kl_l, *, beta, alpha, tdpo2):
    """``tdpo_loss`` of Vance0124/Token-level-Direct-Preference-Optimization (trainers.py)."""
    logps_margin = margin_w - margin_l
    if tdpo2:
        logits = logps_margin - alpha * (kl_l - sg(kl_w))
    else:
        logits = logps_margin - (kl_l - kl_w)
    return batch_mean(-log_sigmoid(beta * logits))


def tdpo(Lp, Lr, y, m, *, beta, alpha=0.5, tdpo2=True):
    """TDPO1/TDPO2 (Zeng et al. 2024): chosen/rejected log-ratio margins and the sequential
    forward KL ``per_position_kl`` summed over completion tokens; TDPO2 detaches the chosen KL."""
    rho = S(Lp, y, m) - S(Lr, y, m)
    seqkl = seqsum(token_forward_kl(Lr, Lp), m)
    return tdpo_from_parts(
        rho[..., W], rho[..., L], seqkl[..., W], seqkl[..., L], beta=beta, alpha=alpha, tdpo2=tdpo2
    )


def tisdpo(Lp, Lr, y, m, *, w, beta):
    """TIS-DPO (Liu et al. 2025; exlaw/TIS-DPO ``tisdpo_loss``, ``token_level: false``):
    ρ̃(y) = Σ_t m_t w_t (ℓ^π_t − ℓ^ref_t), L = −log σ(β[ρ̃(y_w) − ρ̃(y_l)]); weights constant."""
    rho = seqsum(w * (token_logps(Lp, y) - token_logps(Lr, y)), m)
    return batch_mean(-log_sigmoid(beta * (rho[..., W] - rho[..., L])))


def sparsepo(Lp, Lr, y, m, *, mu, md=None, beta, l1_norm_param_u=0.0, l1_norm_param_d=0.0):
    """SparsePO (Christopoulou et al. 2024; HEBO@ee6112d SparsePO/src/trainers/
    sparse_trainer.py ``get_batch_loss_metrics``), both masks on.

    u = Σ m^u Δ_w − Σ m^u Δ_l with Δ_t = ℓ^π_t − ℓ^ref_t; the code's token "kl" is
    Σ_v π_ref (log π − log π_ref) = −KL_t, d = Σ m^d kl_w − Σ m^d kl_l; L = −log σ(β(u − d))
    + λ_u(‖m^u_w‖₁ + ‖m^u_l‖₁) + λ_d(‖m^d_w‖₁ + ‖m^d_l‖₁), norms over completion tokens.
    ``md=None`` is sparse-common (one mask for both), where the trainer's ``__init__`` halves
    both λ ("make up for double adding (from u and d)").
    """
    if md is None:
        md = mu
        l1_norm_param_u, l1_norm_param_d = l1_norm_param_u / 2.0, l1_norm_param_d / 2.0
    reward = seqsum(mu * (token_logps(Lp, y) - token_logps(Lr, y)), m)
    logq = log_softmax(Lr)
    code_kl = np.sum(np.exp(logq) * (log_softmax(Lp) - logq), axis=-1)
    kl = seqsum(md * code_kl, m)
    u = reward[..., W] - reward[..., L]
    d = kl[..., W] - kl[..., L]
    losses = -log_sigmoid(beta * (u - d))
    losses = losses + l1_norm_param_u * np.sum(l1_norm(mu * m), axis=-1)
    losses = losses + l1_norm_param_d * np.sum(l1_norm(md * m), axis=-1)
    return batch_mean(losses)


def lddpo(Lp, Lr, y, m, *, beta, ld_alpha):
    """LD-DPO (Liu et al. 2024; TRL HEAD ``ld_alpha``, applied to policy AND reference):
    S̃(y) = Σ_{t ≤ l_p} m_t ℓ_t + a Σ_{t > l_p} m_t ℓ_t, l_p = min(|y_w|, |y_l|), t counted
    among completion tokens; then DPO on S̃."""
    n = lengths(m)
    l_p = np.minimum(n[:, W], n[:, L])[:, None, None]
    rank = np.cumsum(m, axis=-1)  # 1, 2, ... on completion tokens
    front = m * (rank <= l_p)
    rear = m * (rank > l_p)

    def s_tilde(logits):
        lp = token_logps(logits, y)
        return seqsum(lp, front) + ld_alpha * seqsum(lp, rear)

    rho = s_tilde(Lp) - s_tilde(Lr)
    return batch_mean(-log_sigmoid(beta * (rho[..., W] - rho[..., L])))


def sigmoid_norm(Lp, Lr, y, m, *, beta):
    """TRL ``sigmoid_norm`` (Tülu-3 length-normalised DPO): −log σ(β(ρ_w/|y_w| − ρ_l/|y_l|))."""
    rho = S(Lp, y, m) - S(Lr, y, m)
    n = lengths(m)
    return batch_mean(-log_sigmoid(beta * (rho[..., W] / n[..., W] - rho[..., L] / n[..., L])))


def dpop(Lp, Lr, y, m, *, beta, lam):
    """DPOP / Smaug (Pal et al. 2024): −log σ(β[h − λ·max(0, S^ref_w − S^π_w)])."""
    sp, sr = S(Lp, y, m), S(Lr, y, m)
    penalty = lam * relu(sr[..., W] - sp[..., W])
    return batch_mean(-log_sigmoid(beta * (dpo_h(Lp, Lr, y, m) - penalty)))


def rpo(Lp, Lr, y, m, *, beta, rpo_alpha):
    """RPO (Pang et al. 2024; TRL v0.19 ``rpo_alpha``): L_DPO + α·NLL(y_w), token-mean."""
    return dpo(Lp, Lr, y, m, beta=beta) + rpo_alpha * chosen_nll(Lp, y, m)


def cpo(Lp, y, m, *, beta, cpo_alpha):
    """CPO (Xu et al. 2024; TRL ``CPOTrainer``, ``loss_type='sigmoid'``): mean −log σ(β(S^π_w −
    S^π_l)) + cpo_alpha·NLL(y_w), summed log-probs, no reference."""
    sp = S(Lp, y, m)
    return batch_mean(-log_sigmoid(beta * (sp[..., W] - sp[..., L]))) + cpo_alpha * chosen_nll(
        Lp, y, m
    )


def orpo(Lp, y, m, *, lam):
    """ORPO (Hong et al. 2024; TRL ``odds_ratio_loss``): NLL(y_w) − λ·mean log σ(log odds_w −
    log odds_l), log odds(y) = A − log(1 − e^{A}) with A the average log-prob."""
    avg = S(Lp, y, m) / lengths(m)
    log_odds = (avg[..., W] - avg[..., L]) - (
        np.log1p(-np.exp(avg[..., W])) - np.log1p(-np.exp(avg[..., L]))
    )
    return chosen_nll(Lp, y, m) - batch_mean(lam * log_sigmoid(log_odds))


# ------------------------------------------------------------------------------------------
# Other links and scores on DPO's implicit reward (trl@f2cd577 ``DPOTrainer._compute_loss``)
# ------------------------------------------------------------------------------------------


def _rewards(Lp, Lr, y, m, beta):
    """TRL's chosen/rejected rewards β(S^π − S^ref)."""
    rho = S(Lp, y, m) - S(Lr, y, m)
    return beta * rho[..., W], beta * rho[..., L]


def ipo(Lp, Lr, y, m, *, tau):
    """IPO (Azar et al. 2023, Eq. 17) as TRL: log-probs averaged per token, (h − 1/(2τ))²."""
    n = lengths(m)
    avg_ratio = (S(Lp, y, m) - S(Lr, y, m)) / n
    h = avg_ratio[..., W] - avg_ratio[..., L]
    return batch_mean((h - 1.0 / (2.0 * tau)) ** 2)


def cdpo(Lp, Lr, y, m, *, beta, eps):
    """Conservative DPO (Mitchell 2023, Eq. 3): −(1−ε) log σ(βh) − ε log σ(−βh)."""
    z = beta * dpo_h(Lp, Lr, y, m)
    return batch_mean(-(1.0 - eps) * log_sigmoid(z) - eps * log_sigmoid(-z))


def robust(Lp, Lr, y, m, *, beta, eps):
    """Robust DPO (Chowdhury et al. 2024): [−(1−ε) log σ(βh) + ε log σ(−βh)] / (1 − 2ε)."""
    z = beta * dpo_h(Lp, Lr, y, m)
    return batch_mean((-(1.0 - eps) * log_sigmoid(z) + eps * log_sigmoid(-z)) / (1.0 - 2.0 * eps))


def hinge(Lp, Lr, y, m, *, beta):
    """TRL ``hinge`` (RSO hinge-norm): max(0, 1 − βh)."""
    return batch_mean(relu(1.0 - beta * dpo_h(Lp, Lr, y, m)))


def exo(Lp, Lr, y, m, *, beta, eps):
    """EXO (Ji et al. 2024, Eq. 16; TRL ``exo_pair``): σ(βh)[log σ(βh) − log(1−ε)] +
    σ(−βh)[log σ(−βh) − log ε]."""
    z = beta * dpo_h(Lp, Lr, y, m)
    per_pair = sigmoid(z) * (log_sigmoid(z) - np.log(1.0 - eps)) + sigmoid(-z) * (
        log_sigmoid(-z) - np.log(eps)
    )
    return batch_mean(per_pair)


def nca(Lp, Lr, y, m, *, beta):
    """NCA (Chen et al. 2024; TRL ``nca_pair``): −log σ(r_w) − ½ log σ(−r_w) − ½ log σ(−r_l)."""
    rw, rl = _rewards(Lp, Lr, y, m, beta)
    return batch_mean(-log_sigmoid(rw) - 0.5 * log_sigmoid(-rw) - 0.5 * log_sigmoid(-rl))


def bco_pair(Lp, Lr, y, m, *, beta):
    """BCO, TRL HEAD ``bco_pair`` (no running-mean δ): −log σ(r_w) − log σ(−r_l)."""
    rw, rl = _rewards(Lp, Lr, y, m, beta)
    return batch_mean(-log_sigmoid(rw) - log_sigmoid(-rl))


def sppo_hard(Lp, Lr, y, m, *, beta):
    """SPPO-hard (Wu et al. 2024; TRL): (ρ_w − 1/(2β))² + (ρ_l + 1/(2β))²."""
    rho = S(Lp, y, m) - S(Lr, y, m)
    return batch_mean((rho[..., W] - 0.5 / beta) ** 2 + (rho[..., L] + 0.5 / beta) ** 2)


def apo_zero(Lp, Lr, y, m, *, beta):
    """APO-zero (D'Oosterlinck et al. 2024; TRL): (1 − σ(r_w)) + σ(r_l)."""
    rw, rl = _rewards(Lp, Lr, y, m, beta)
    return batch_mean((1.0 - sigmoid(rw)) + sigmoid(rl))


def apo_down(Lp, Lr, y, m, *, beta):
    """APO-down (TRL): σ(r_w) + (1 − σ(β(ρ_w − ρ_l)))."""
    rw, rl = _rewards(Lp, Lr, y, m, beta)
    return batch_mean(sigmoid(rw) + (1.0 - sigmoid(rw - rl)))


def discopop(Lp, Lr, y, m, *, beta, tau):
    """DiscoPOP (Lu et al. 2024; TRL): (1 − σ(z/τ))(−log σ(z)) + σ(z/τ)e^{−z}, z = βh."""
    z = beta * dpo_h(Lp, Lr, y, m)
    modulation = sigmoid(z / tau)
    return batch_mean(-log_sigmoid(z) * (1.0 - modulation) + np.exp(-z) * modulation)


def _smoothed(delta, beta, eps):
    return -log_sigmoid(beta * delta) * (1.0 - eps) - log_sigmoid(-beta * delta) * eps


def aot(Lp, Lr, y, m, *, beta, eps=0.0):
    """AOT paired (Melnyk et al. 2024; TRL ``aot``): sort S^π_w − S^π_l and S^ref_w − S^ref_l over
    the batch separately, subtract, then a (smoothed) logistic."""
    sp, sr = S(Lp, y, m), S(Lr, y, m)
    delta = sort_batch(sp[..., W] - sp[..., L]) - sort_batch(sr[..., W] - sr[..., L])
    return batch_mean(_smoothed(delta, beta, eps))


def aot_unpaired(Lp, Lr, y, m, *, beta, eps=0.0):
    """AOT unpaired (TRL ``aot_unpaired``, v0.19 ``aot_pair``): sort ρ_w and ρ_l separately."""
    rho = S(Lp, y, m) - S(Lr, y, m)
    delta = sort_batch(rho[..., W]) - sort_batch(rho[..., L])
    return batch_mean(_smoothed(delta, beta, eps))


def f_prime(u_log, divergence, alpha=None):
    """f'(u) of the f-DPO generator f, at u = π/π_ref = e^{u_log} (Wang et al. 2023, Table 1).

    reverse KL f = u log u: f' = log u + 1; forward KL f = −log u: f' = −1/u;
    JS f = u log u − (u + 1) log((u + 1)/2): f' = log(2u/(1 + u));
    α-divergence f = (u^{1−α} − (1−α)u − α)/(α(α−1)): f' = (1 − u^{−α})/α.
    """
    u = np.exp(u_log)
    if divergence == "reverse_kl":
        return np.log(u) + 1.0
    if divergence == "forward_kl":
        return -1.0 / u
    if divergence == "js_divergence":
        return np.log(2.0 * u / (1.0 + u))
    if divergence == "alpha_divergence":
        return (1.0 - u ** (-alpha)) / alpha
    raise ValueError(divergence)


def fdpo(Lp, Lr, y, m, *, beta, divergence, alpha=None):
    """f-DPO (Wang et al. 2023): −log σ(β f'(π/π_ref)(y_w) − β f'(π/π_ref)(y_l)); ``alpha`` is
    the paper's α (TRL HEAD's coefficient a = 1 − α)."""
    rho = S(Lp, y, m) - S(Lr, y, m)
    g = f_prime(rho, divergence, alpha)
    return batch_mean(-log_sigmoid(beta * g[..., W] - beta * g[..., L]))


def wpo(Lp, Lr, y, m, *, beta):
    """WPO (Zhou et al. 2024; TRL HEAD ``use_weighting``, no clamp): w(y) = exp(mean_t[ℓ^π_t −
    log Σ_v π_θ(v)²]) under no_grad; pair loss w(y_w)·w(y_l)·L_DPO."""
    logp = log_softmax(Lp)
    adjust = np.log(np.sum(np.exp(2.0 * logp), axis=-1))
    per_seq = seqsum(token_logps(Lp, y) - adjust, m) / lengths(m)
    weights = sg(np.exp(per_seq[..., W] + per_seq[..., L]))
    return batch_mean(-log_sigmoid(beta * dpo_h(Lp, Lr, y, m)) * weights)


def mpo(Lp, Lr, y, m, *, beta, weights=(0.8, 0.2, 1.0)):
    """TRL ``loss_type=["sigmoid", "bco_pair", "sft"]`` with ``loss_weights``: the weighted sum
    of each loss type's batch loss (MPO)."""
    w_sigmoid, w_bco, w_sft = weights
    return (
        w_sigmoid * dpo(Lp, Lr, y, m, beta=beta)
        + w_bco * bco_pair(Lp, Lr, y, m, beta=beta)
        + w_sft * chosen_nll(Lp, y, m)
    )
