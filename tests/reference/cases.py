"""The mathematics §2 harness: each algorithm's original formula next to MI-DPO from its config.

This is the only module under ``tests/reference`` that imports ``mipo_jax``: the originals
(``originals.py``) and their complex-step gradients (``complex_step.py``) stay independent.

A :class:`Case` names a config file (``configs/<config>.py:<arg>``), the original formula
with the config's hyper-parameters, and the table's description of the prior. Both sides
are functions of the same raw inputs (logits, ids, masks, extras), so the comparison covers
the log-prob step too. Call everything here under ``jax.enable_x64(True)``.
"""

import dataclasses
import importlib
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from mipo_jax.losses import mipo_loss, scores, validate
from mipo_jax.losses.logps import (
    chunked_token_logps,
    chunked_token_stats,
    token_kl,
    token_logps,
    token_logsumsq,
)
from mipo_jax.types import TokenInputs
from tests.reference import complex_step
from tests.reference import originals as O
from tests.reference.fixture import Fixture

ARRAYS = ("Lp", "Lr", "Lprev", "mu", "md")  # differentiable inputs, in jax.grad's order


@dataclasses.dataclass(frozen=True)
class Case:
    """One row of the MI-DPO table.

    Attributes:
      name: test id and table row.
      config: ``configs/<config>.py``; ``arg`` its ``get_config`` argument.
      original: ``(config, fixture, **arrays) -> loss`` in NumPy, from ``originals``.
      prior: the prior ζ (or the MI-DPO reading), in symbols.
      fit: "exact", "conditional" or "extension" (not MI-DPO proper).
      condition: what the fit needs, or which extension it is.
      previous: the MI side's reference field is the previous iterate (DICE, SPIN).
      extras: differentiable extra inputs the loss reads ("mu", "md": SparsePO masks).
      weights: TIS-DPO token weights are passed.
      theta_prior: log ζ depends on the policy (the gradient must flow through ζ).
      tweak: edits the loaded config (non-default settings worth covering).
    """

    name: str
    config: str
    arg: str | None
    original: Callable
    prior: str
    fit: str
    condition: str
    previous: bool = False
    extras: tuple[str, ...] = ()
    weights: bool = False
    theta_prior: bool = False
    tweak: Callable | None = None

    @property
    def reference_name(self) -> str:
        return "Lprev" if self.previous else "Lr"

    @property
    def compared(self) -> tuple[str, ...]:
        """Inputs whose gradients are compared: policy, reference side, extras."""
        return ("Lp", self.reference_name, *self.extras)

    @property
    def label(self) -> str:
        return f"configs/{self.config}.py" + (f":{self.arg}" if self.arg else "")


def load_config(case: Case):
    """``configs/<config>.py`` ``get_config(arg)`` plus the case's tweak, validated."""
    config = importlib.import_module(f"configs.{case.config}").get_config(case.arg)
    if case.tweak is not None:
        case.tweak(config)
    validate(config.loss)
    return config


# ------------------------------------------------------------------------------------------
# The MI-DPO side
# ------------------------------------------------------------------------------------------


def _extras(case: Case, fx: Fixture, mu, md) -> dict:
    """The per-algorithm fields: TIS-DPO weights, SparsePO masks (None when not read)."""
    return dict(
        token_weights=jnp.asarray(fx.w) if case.weights else None,
        mask_u=mu if "mu" in case.extras else None,
        mask_d=md if "md" in case.extras else None,
    )


def token_inputs(case: Case, fx: Fixture, Lp, Lr, Lprev, mu, md) -> TokenInputs:
    """TokenInputs from raw logits with the package's log-prob functions (differentiable)."""
    y, m = jnp.asarray(fx.y), jnp.asarray(fx.m)
    return TokenInputs(
        policy=token_logps(Lp, y),
        mask=m,
        reference=token_logps(Lprev if case.previous else Lr, y),
        kl=token_kl(Lr, Lp),
        logsumsq=token_logsumsq(Lp),
        **_extras(case, fx, mu, md),
    )


CHUNK = 3  # tokens per chunk on the trainer's path: T = 7 is not a multiple (padding)


@jax.jit
def _trainer_fields(Lp, Lr, Lprev, y):
    """(policy, kl, logsumsq, reference, previous) per token on the trainer's path; jitted once
    for every case (the chunked scans are slow to run op by op)."""
    eye = jnp.eye(Lp.shape[-1], dtype=Lp.dtype)
    stats = chunked_token_stats(Lp, eye, y, logsumsq=True, ref_h=Lr, ref_w=eye, chunk_size=CHUNK)
    frozen = [jax.lax.stop_gradient(chunked_token_logps(x, eye, y, chunk_size=CHUNK))
              for x in (Lr, Lprev)]  # fmt: skip
    return stats.logps, stats.kl, stats.logsumsq, *frozen


def trainer_token_inputs(case: Case, fx: Fixture, Lp, Lr, Lprev, mu, md) -> TokenInputs:
    """TokenInputs as ``mipo_jax/train/step.py`` builds them from a live, frozen reference.

    The chunked custom-VJP path (``chunked_token_stats``) with an identity unembedding, so
    its hidden states are the logits: policy log-probs, log Σπ² and the KL to the reference,
    whose gradient into the reference the function itself stops; the reference log-probs
    wrapped in ``stop_gradient`` as the train step does.
    """
    policy, kl, logsumsq, ref, prev = _trainer_fields(Lp, Lr, Lprev, jnp.asarray(fx.y))
    return TokenInputs(
        policy=policy,
        mask=jnp.asarray(fx.m),
        reference=prev if case.previous else ref,
        kl=kl,
        logsumsq=logsumsq,
        **_extras(case, fx, mu, md),
    )


def mi_loss_fn(case: Case, config, fx: Fixture, *, trainer_path: bool = False):
    """``f(Lp, Lr, Lprev, mu, md) -> loss`` of MI-DPO as configured.

    ``trainer_path``: inputs from :func:`trainer_token_inputs` (frozen reference, chunked
    log-probs) instead of the naive, fully differentiable :func:`token_inputs`.
    """
    build = trainer_token_inputs if trainer_path else token_inputs

    def f(Lp, Lr, Lprev, mu, md):
        return mipo_loss(build(case, fx, Lp, Lr, Lprev, mu, md), config.loss)[0]

    return f


def log_prior_fn(case: Case, config, fx: Fixture):
    """``f(Lp, Lr, Lprev, mu, md) -> log ζ [B, 2]`` as the loss sees it."""

    def f(Lp, Lr, Lprev, mu, md):
        return scores(token_inputs(case, fx, Lp, Lr, Lprev, mu, md), config.loss).prior

    return f


def loss_with_frozen_prior(inputs: TokenInputs, loss_cfg):
    """MI-DPO with the configured prior wrapped in ``stop_gradient`` (mathematics §2.4(c)).

    The prior's sequence score log ζ is spread evenly over the completion tokens of the
    ``learned``-prior field, which sums back to log ζ, with the gradient stopped.
    """
    log_zeta = jax.lax.stop_gradient(scores(inputs, loss_cfg).prior)
    n = jnp.sum(inputs.mask, axis=-1)
    if loss_cfg.normalize == "mean":  # scores() divided log ζ by |y|; 'learned' divides again
        log_zeta = log_zeta * n
    frozen = loss_cfg.copy_and_resolve_references()
    frozen.prior = dict(name="learned")
    spread = inputs.mask * (log_zeta / n)[..., None]
    return mipo_loss(inputs.replace(prior=spread), frozen)[0]


def frozen_prior_loss_fn(case: Case, config, fx: Fixture):
    """``f(Lp, Lr, Lprev, mu, md) -> loss`` of :func:`loss_with_frozen_prior`."""

    def f(Lp, Lr, Lprev, mu, md):
        return loss_with_frozen_prior(token_inputs(case, fx, Lp, Lr, Lprev, mu, md), config.loss)

    return f


# ------------------------------------------------------------------------------------------
# Measurements shared by the tests and the table
# ------------------------------------------------------------------------------------------


def original_fn(case: Case, config, fx: Fixture, name: str):
    """The original loss as a function of one input (the others fixed), for complex step."""
    arrays = fx.arrays()

    def f(x):
        return case.original(config, fx, **{**arrays, name: x})

    return f


def original_grads(case: Case, config, fx: Fixture) -> dict[str, np.ndarray]:
    return {
        n: complex_step.grad(original_fn(case, config, fx, n), fx.arrays()[n])
        for n in case.compared
    }


def jax_value_and_grads(fn, fx: Fixture) -> tuple[float, dict[str, np.ndarray]]:
    args = [jnp.asarray(fx.arrays()[n]) for n in ARRAYS]
    value, grads = jax.value_and_grad(fn, argnums=tuple(range(len(ARRAYS))))(*args)
    return float(value), {n: np.asarray(g) for n, g in zip(ARRAYS, grads, strict=True)}


@dataclasses.dataclass(frozen=True)
class Comparison:
    loss_orig: float
    loss_mi: float
    grad_orig: dict[str, np.ndarray]
    grad_mi: dict[str, np.ndarray]

    @property
    def dloss(self) -> float:
        return abs(self.loss_orig - self.loss_mi)

    def dgrad(self, name: str) -> float:
        return float(np.max(np.abs(self.grad_orig[name] - self.grad_mi[name])))


def compare(case: Case, config, fx: Fixture) -> Comparison:
    """Original (NumPy, complex step) against MI-DPO (JAX, autodiff) at one fixture."""
    loss_orig = complex_step.value(original_fn(case, config, fx, "Lp"), fx.Lp)
    loss_mi, grad_mi = jax_value_and_grads(mi_loss_fn(case, config, fx), fx)
    return Comparison(loss_orig, loss_mi, original_grads(case, config, fx), grad_mi)


# ------------------------------------------------------------------------------------------
# The originals with each config's hyper-parameters
# ------------------------------------------------------------------------------------------


def _beta(c):
    return c.loss.alpha


def _dpo(c, fx, Lp, Lr, **_):
    return O.dpo(Lp, Lr, fx.y, fx.m, beta=_beta(c))


def _dice(c, fx, Lp, Lprev, **_):
    return O.dice_round(Lp, Lprev, fx.y, fx.m, beta=_beta(c))


def _spin(c, fx, Lp, Lprev, **_):
    return O.spin(Lp, Lprev, fx.y, fx.m, lam=_beta(c))


def _hdpo(c, fx, Lp, Lr, **_):
    return O.hdpo(Lp, Lr, fx.y, fx.m, beta=c.hdpo_beta, a=c.loss.prior.temperature)


def _simpo(c, fx, Lp, **_):
    beta = _beta(c)
    return O.simpo(Lp, fx.y, fx.m, beta=beta, gamma=beta * c.gamma_beta_ratio)


def _rdpo(c, fx, Lp, Lr, **_):
    return O.rdpo(Lp, Lr, fx.y, fx.m, beta=_beta(c), alpha=c.loss.prior.length_coef)


def _tdpo(tdpo2):
    def f(c, fx, Lp, Lr, **_):
        return O.tdpo(Lp, Lr, fx.y, fx.m, beta=_beta(c), alpha=c.loss.prior.kl_coef, tdpo2=tdpo2)

    return f


def _tisdpo(c, fx, Lp, Lr, **_):
    return O.tisdpo(Lp, Lr, fx.y, fx.m, w=fx.w, beta=_beta(c))


def _sparsepo(independent):
    def f(c, fx, Lp, Lr, mu, md, **_):
        return O.sparsepo(
            Lp, Lr, fx.y, fx.m, mu=mu, md=md if independent else None, beta=_beta(c),
            l1_norm_param_u=c.loss.l1_mask_u, l1_norm_param_d=c.loss.l1_mask_d,
        )  # fmt: skip

    return f


def _link(fn, **params):
    """An original on DPO's implicit reward, β = the config's alpha, extra params from it."""

    def f(c, fx, Lp, Lr, **_):
        return fn(Lp, Lr, fx.y, fx.m, **{k: get(c) for k, get in params.items()})

    return f


def _fdpo(c, fx, Lp, Lr, **_):
    div = c.loss.f_divergence
    alpha = 1.0 - c.loss.f_alpha if div == "alpha_divergence" else None  # a_TRL = 1 − α
    return O.fdpo(Lp, Lr, fx.y, fx.m, beta=_beta(c), divergence=div, alpha=alpha)


def _cpo(c, fx, Lp, **_):
    return O.cpo(Lp, fx.y, fx.m, beta=_beta(c), cpo_alpha=c.loss.sft_weight)


def _orpo(c, fx, Lp, **_):
    (lam,) = c.loss.link_weights
    return O.orpo(Lp, fx.y, fx.m, lam=lam)


def _mpo(c, fx, Lp, Lr, **_):
    weights = (*c.loss.link_weights, c.loss.sft_weight)
    return O.mpo(Lp, Lr, fx.y, fx.m, beta=_beta(c), weights=weights)


def _l1(u, d):
    def tweak(c):
        c.loss.l1_mask_u, c.loss.l1_mask_d = u, d

    return tweak


def _length_normalized_prior(c):
    """sigmoid_norm through its θ-dependent prior (normalize='sum') instead of 'mean'."""
    c.loss.prior = dict(name="length_normalized")
    c.loss.normalize = "sum"


BETA = dict(beta=_beta)
EPS = dict(beta=_beta, eps=lambda c: c.loss.label_smoothing)
THETA = "gradient must flow through ζ"

CASES: tuple[Case, ...] = (
    # --- MI-DPO's eight and the other exact fits ---------------------------------------
    Case("dpo", "dpo", None, _dpo, "π_ref(y|x)", "exact", "θ-independent prior"),
    Case("dice", "dice", None, _dice, "π_{t−1}(y|x), the previous iterate", "exact",
         "per-round loss, given the round's pairs", previous=True),
    Case("spin", "spin", None, _spin, "π_t(y|x), the previous iterate", "exact",
         "θ-independent prior", previous=True),
    Case("hdpo", "hdpo", None, _hdpo, "π_ref(y|x)^{1/a}, α = a·β", "exact",
         "θ-independent prior"),
    Case("simpo_i", "simpo", "mapping=i", _simpo,
         "uniform, on π̄ = π^{1/|y|} (normalize='mean'), margin γ", "exact",
         "length-normalised policy; γ is the margin, not a prior"),
    Case("simpo_ii", "simpo", "mapping=ii", _simpo,
         "exp[(1 − 1/|y|)·S^π(y)] · e^{±γ/(2β)} (+ on y_w, − on y_l)", "conditional",
         f"{THETA}; label-dependent offset", theta_prior=True),
    Case("rdpo", "rdpo", None, _rdpo, "π_ref(y|x)·e^{−α_R|y|/β}", "exact",
         "θ-independent prior"),
    Case("tdpo1", "tdpo", "variant=tdpo1", _tdpo(False),
         "π_ref(y|x)·e^{−SeqKL(y)}, SeqKL = Σ_t KL(π_ref‖π_θ)_t", "conditional", THETA,
         theta_prior=True),
    Case("tdpo2", "tdpo", "variant=tdpo2", _tdpo(True),
         "π_ref(y|x)·e^{−α_T·SeqKL(y)}, sg(SeqKL) on y_w", "conditional",
         f"{THETA} on y_l only (label-dependent stop-gradient)", theta_prior=True),
    Case("tisdpo", "tisdpo", None, _tisdpo, "Π_t π_θ(y_t)^{1−w_t} π_ref(y_t)^{w_t}",
         "conditional", f"{THETA}; weights are constants", weights=True, theta_prior=True),
    Case("sparsepo_common", "sparsepo", None, _sparsepo(False),
         "Π_t π_θ^{1−m_t} π_ref^{m_t} e^{−m_t KL_t}, one learned mask m", "conditional",
         f"{THETA} (policy and mask)", extras=("mu",), theta_prior=True),
    Case("sparsepo_common_l1", "sparsepo", None, _sparsepo(False),
         "as sparsepo_common, + L1 on m (λ_u = λ_d = 0.001, HH)", "conditional",
         f"{THETA}; L1 is an extra term on the prior's parameters", extras=("mu",),
         theta_prior=True, tweak=_l1(0.001, 0.001)),
    Case("sparsepo_indp_l1", "sparsepo", "independent", _sparsepo(True),
         "Π_t π_θ^{1−m^u_t} π_ref^{m^u_t} e^{−m^d_t KL_t}, + L1 (λ_u = 0.01, λ_d = 0.02)",
         "conditional", f"{THETA}; L1 is an extra term", extras=("mu", "md"),
         theta_prior=True, tweak=_l1(0.01, 0.02)),
    Case("lddpo", "lddpo", None, _link(O.lddpo, beta=_beta, ld_alpha=lambda c:
                                       c.loss.prior.ld_alpha),
         "Π_t π_ref(y_t)^{c_t} π_θ(y_t)^{1−c_t}, c_t = 1 (t ≤ l_p), a after", "conditional",
         f"{THETA}; depends on the pair (l_p)", theta_prior=True),
    Case("sigmoid_norm", "sigmoid_norm", None, _link(O.sigmoid_norm, **BETA),
         "π_ref, on π̄ = π^{1/|y|} (normalize='mean')", "exact", "length-normalised scores"),
    Case("sigmoid_norm_prior", "sigmoid_norm", None, _link(O.sigmoid_norm, **BETA),
         "exp[S^π(y) − ρ(y)/|y|] (normalize='sum')", "conditional", THETA,
         theta_prior=True, tweak=_length_normalized_prior),
    Case("dpop", "dpop", None, _link(O.dpop, beta=_beta, lam=lambda c:
                                     c.loss.prior.dpop_lambda),
         "π_ref·e^{λ·max(0, S^ref − S^π)} on y_w, π_ref on y_l", "conditional",
         f"{THETA}; label-dependent", theta_prior=True),
    Case("rpo", "rpo", None, _link(O.rpo, beta=_beta, rpo_alpha=lambda c: c.loss.sft_weight),
         "π_ref(y|x), + NLL(y_w)", "exact", "MI-DPO plus an NLL term"),
    Case("cpo", "cpo", None, _cpo, "uniform, + NLL(y_w)", "exact", "MI-DPO plus an NLL term"),
    Case("orpo", "orpo", None, _orpo, "(1 − e^{A(y)})^{|y|}, on π̄ (mean), α = 1, + NLL",
         "conditional", f"{THETA}; plus an NLL term", theta_prior=True),
    # --- other links, labels, scores and weights on MI-DPO's implicit reward ------------
    Case("ipo", "ipo", None, _link(O.ipo, tau=_beta), "π_ref, on π̄ (mean)", "extension",
         "not MI-DPO: squared link (h − 1/(2τ))²"),
    Case("cdpo", "cdpo", None, _link(O.cdpo, **EPS), "π_ref", "extension",
         "not MI-DPO: soft labels (label smoothing ε)"),
    Case("robust", "robust", None, _link(O.robust, **EPS), "π_ref", "extension",
         "not MI-DPO: debiased noisy-label logistic"),
    Case("hinge", "hinge", None, _link(O.hinge, **BETA), "π_ref", "extension",
         "not MI-DPO: hinge link"),
    Case("exo", "exo", None, _link(O.exo, **EPS), "π_ref", "extension",
         "not MI-DPO: reverse KL to soft labels"),
    Case("nca", "nca", None, _link(O.nca, **BETA), "π_ref", "extension",
         "not MI-DPO: pointwise"),
    Case("bco", "bco", None, _link(O.bco_pair, **BETA), "π_ref", "extension",
         "not MI-DPO: pointwise (TRL HEAD, no δ)"),
    Case("sppo", "sppo", None, _link(O.sppo_hard, **BETA), "π_ref", "extension",
         "not MI-DPO: pointwise squared"),
    Case("apo_zero", "apo", "variant=zero", _link(O.apo_zero, **BETA), "π_ref", "extension",
         "not MI-DPO: pointwise"),
    Case("apo_down", "apo", "variant=down", _link(O.apo_down, **BETA), "π_ref", "extension",
         "not MI-DPO: other link"),
    Case("discopop", "discopop", None,
         _link(O.discopop, beta=_beta, tau=lambda c: c.loss.discopop_tau), "π_ref",
         "extension", "not MI-DPO: modulated logistic"),
    Case("aot", "aot", "variant=paired", _link(O.aot, **EPS), "π_ref", "extension",
         "not MI-DPO: couples the batch (sorted margins)"),
    Case("aot_unpaired", "aot", "variant=unpaired", _link(O.aot_unpaired, **EPS), "π_ref",
         "extension", "not MI-DPO: couples the batch (sorted log-ratios)"),
    Case("fdpo_forward_kl", "fdpo", "divergence=forward_kl", _fdpo, "π_ref", "extension",
         "not MI-DPO: score 1 − e^{−ρ} (forward KL)"),
    Case("fdpo_js", "fdpo", "divergence=js_divergence", _fdpo, "π_ref", "extension",
         "not MI-DPO: score log 2 + log σ(ρ) (Jensen–Shannon)"),
    Case("fdpo_alpha", "fdpo", "divergence=alpha_divergence", _fdpo, "π_ref", "extension",
         "not MI-DPO: score (1 − e^{−αρ})/α (α-divergence)"),
    Case("wpo", "wpo", None, _link(O.wpo, **BETA), "π_ref", "extension",
         "not MI-DPO: stop-gradient pair weights outside the logistic"),
    Case("mpo", "mpo", None, _mpo, "π_ref", "extension",
         "mixture: 0.8·sigmoid + 0.2·bco_pair + 1.0·sft"),
)  # fmt: skip

BY_NAME = {case.name: case for case in CASES}
