"""The exact bandit of the reproductions (mathematics §1.2, §3): closed forms and optimisers.

Prompts x with weights ρ(x), responses y ∈ {0..K-1}, a reward r(x, y), a full-support
reference π_ref(·|x) and a pair-sampling distribution μ(·|x); a tabular policy
π_θ(·|x) = softmax(θ_x). Everything is float64.

* Closed forms (NumPy): the Gibbs policy π ∝ ζ e^{r/α}, Blahut–Arimoto, the mutual
  information, the Bayes risk of Bradley–Terry labels.
* Population losses go through OUR loss, :func:`mipo_jax.losses.mipo_loss`, one pair at a
  time (a response is one token), weighted by each pair's population probability; they are
  minimised over the logits with scipy's BFGS (value and gradient from JAX in float64) or
  traced step by step with gradient descent.

The derivation tests keep their own copy of these pieces (``tests/derivations/util.py``);
``tests/experiments/test_bandit_ground_truth.py`` checks this module's closed forms against
brute-force optimisation.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
import scipy.optimize

from mipo_jax.losses import loss_config, mipo_loss, validate
from mipo_jax.types import TokenInputs

# ---- NumPy float64 closed forms ----------------------------------------------------------


def log_softmax(a, axis=-1):
    a = np.asarray(a, np.float64)
    m = np.max(a, axis=axis, keepdims=True)
    return a - m - np.log(np.sum(np.exp(a - m), axis=axis, keepdims=True))


def softmax(a, axis=-1):
    return np.exp(log_softmax(a, axis))


def sigmoid(z):
    return np.exp(-np.logaddexp(0.0, -np.asarray(z, np.float64)))


def entropy(p, axis=-1):
    """Shannon entropy in nats (0 log 0 = 0)."""
    p = np.asarray(p, np.float64)
    return -np.sum(np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0), axis=axis)


def kl(p, q, axis=-1):
    """KL(p ‖ q) in nats."""
    p, q = np.asarray(p, np.float64), np.asarray(q, np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):  # q = 0 only where p = 0
        return np.sum(np.where(p > 0, p * (np.log(np.where(p > 0, p, 1.0)) - np.log(q)), 0), axis)


def gibbs(log_base, r, alpha):
    """π(y|x) ∝ base(y|x) · exp(r(x, y)/α) (the minimiser of MI-DPO with prior base)."""
    return softmax(np.asarray(log_base, np.float64) + np.asarray(r) / alpha)


@dataclass(frozen=True)
class Bandit:
    rho: np.ndarray  # [X] prompt weights
    r: np.ndarray  # [X, K] rewards
    ref: np.ndarray  # [X, K] π_ref
    mu: np.ndarray  # [X, K] pair-sampling distribution

    @property
    def n_x(self) -> int:
        return self.r.shape[0]

    @property
    def k(self) -> int:
        return self.r.shape[1]


def make_bandit(seed: int, n_x: int = 4, k: int = 6) -> Bandit:
    """A random bandit whose best response differs between prompts (so I(X;Y) matters):
    r = 1[y ≡ x mod K]·1.5 + N(0, 0.5²); π_ref and μ Dirichlet."""
    rng = np.random.default_rng(seed)
    r = 1.5 * (np.arange(k)[None, :] == (np.arange(n_x)[:, None] % k)) + 0.5 * rng.normal(
        size=(n_x, k)
    )
    return Bandit(
        rho=rng.dirichlet(np.full(n_x, 4.0)),
        r=r,
        ref=rng.dirichlet(np.full(k, 2.0), size=n_x),
        mu=rng.dirichlet(np.full(k, 4.0), size=n_x),
    )


def expected_reward(b: Bandit, pi) -> float:
    return float(np.sum(b.rho * np.sum(pi * b.r, -1)))


def marginal(b: Bandit, pi) -> np.ndarray:
    """p_π(y) = Σ_x ρ(x) π(y|x)."""
    return b.rho @ pi


def mutual_information(b: Bandit, pi) -> float:
    """I_π(X;Y) = H(p_π) − Σ_x ρ(x) H(π(·|x)) (entropy form)."""
    return float(entropy(marginal(b, pi)) - np.sum(b.rho * entropy(pi)))


def kl_to_ref(b: Bandit, pi) -> float:
    """E_x KL(π(·|x) ‖ π_ref(·|x))."""
    return float(np.sum(b.rho * kl(pi, b.ref)))


def mi_objective(b: Bandit, pi, alpha: float) -> float:
    """max_ζ E[r] − α E_x KL(π‖ζ) = E[r] − α I_π(X;Y) (mathematics §1.2)."""
    return expected_reward(b, pi) - alpha * mutual_information(b, pi)


def kl_objective(b: Bandit, pi, alpha: float) -> float:
    """DPO's objective E[r] − α E_x KL(π‖π_ref)."""
    return expected_reward(b, pi) - alpha * kl_to_ref(b, pi)


def blahut_arimoto(b: Bandit, alpha: float, zeta0=None, iters: int = 100_000, tol=1e-14):
    """π ∝ ζ e^{r/α}, ζ ← p_π until ζ moves by less than ``tol``: (π, ζ, iterations)."""
    zeta = np.full(b.k, 1.0 / b.k) if zeta0 is None else np.asarray(zeta0, np.float64)
    with np.errstate(divide="ignore"):  # at small α the marginal can underflow to 0
        steps = 0
        while steps < iters:
            steps += 1
            pi = gibbs(np.log(zeta)[None, :], b.r, alpha)
            new = marginal(b, pi)
            if np.max(np.abs(new - zeta)) < tol:
                zeta = new
                break
            zeta = new
        return gibbs(np.log(zeta)[None, :], b.r, alpha), zeta, steps


def bayes_risk(b: Bandit) -> float:
    """E[H_b(σ(Δr))]: the population logistic loss of the true Bradley–Terry model."""
    p = sigmoid(b.r[:, :, None] - b.r[:, None, :])
    w = b.rho[:, None, None] * b.mu[:, :, None] * b.mu[:, None, :]
    return float(np.sum(w * entropy(np.stack([p, 1 - p]), axis=0)))


# ---- population losses through mipo_loss --------------------------------------------------


def bt_pairs(b: Bandit):
    """Every labelled pair (x, y_w, y_l) with its population weight ρ μ μ σ(±Δr) (sums to 1)."""
    x, y1, y2 = np.meshgrid(np.arange(b.n_x), np.arange(b.k), np.arange(b.k), indexing="ij")
    x, y1, y2 = x.ravel(), y1.ravel(), y2.ravel()
    base = b.rho[x] * b.mu[x, y1] * b.mu[x, y2]
    p12 = sigmoid(b.r[x, y1] - b.r[x, y2])
    return (
        np.concatenate([x, x]),
        np.concatenate([y1, y2]),
        np.concatenate([y2, y1]),
        np.concatenate([base * p12, base * (1.0 - p12)]),
    )


def make_cfg(alpha: float, link: str = "sigmoid", prior: str = "reference", mi_weight=0.0):
    cfg = loss_config(prior)
    cfg.alpha, cfg.links, cfg.mi_weight = float(alpha), (link,), float(mi_weight)
    validate(cfg)
    return cfg


def pair_loss(cfg, pairs):
    """``f(theta [X,K], log_prior [X,K]) -> Σ_pairs weight · mipo_loss(pair)``.

    The prior's log-scores go into the loss's ``reference`` field (prior ``reference``): the
    loss sees only log π − log ζ, so this is MI-DPO with that prior (DPO for ζ = π_ref).
    """
    xs, win, lose, weight = (np.asarray(a) for a in pairs)
    mask = jnp.ones((1, 2, 1))

    def one(pol2, pri2):
        inputs = TokenInputs(policy=pol2[None, :, None], mask=mask, reference=pri2[None, :, None])
        return mipo_loss(inputs, cfg)[0]

    def loss(theta, log_prior):
        logpi = jax.nn.log_softmax(theta, axis=-1)
        pol = jnp.stack([logpi[xs, win], logpi[xs, lose]], axis=-1)
        pri = jnp.stack([log_prior[xs, win], log_prior[xs, lose]], axis=-1)
        return jnp.sum(jnp.asarray(weight) * jax.vmap(one)(pol, pri))

    return loss


def _x64(fn):
    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        with jax.enable_x64(True):
            return fn(*args, **kwargs)

    return wrapped


class Minimiser:
    """BFGS on ``f(theta, log_prior)`` over theta, compiled once (log_prior is an argument)."""

    def __init__(self, loss):
        with jax.enable_x64(True):
            self._vg = jax.jit(jax.value_and_grad(loss))

    @_x64
    def value(self, theta, log_prior) -> float:
        """The loss at ``theta`` (e.g. log π of a policy found otherwise)."""
        args = (np.asarray(a, np.float64) for a in (theta, log_prior))
        return float(self._vg(*(jnp.asarray(a) for a in args))[0])

    @_x64
    def __call__(self, theta0, log_prior, gtol=1e-11):
        shape = np.shape(theta0)
        lp = jnp.asarray(np.asarray(log_prior, np.float64))

        def f(v):
            val, grad = self._vg(jnp.asarray(v.reshape(shape)), lp)
            return float(val), np.asarray(grad, np.float64).ravel()

        res = scipy.optimize.minimize(
            f, np.asarray(theta0, np.float64).ravel(), jac=True, method="BFGS",
            options=dict(gtol=gtol, maxiter=20_000),
        )  # fmt: skip
        return res.x.reshape(shape), float(res.fun)


def ba_by_loss(b: Bandit, minimiser: Minimiser, alpha: float, outer: int = 200, tol=1e-9):
    """Blahut–Arimoto with the π-step done by minimising the population MI-DPO loss.

    Alternate θ ← argmin_θ J_MI-DPO(π_θ; ζ) (BFGS, warm-started) and ζ ← p_π. Returns
    (π, ζ = p_π, outer steps, the ζ of the last π-step). No closed form is used.
    """
    zeta = np.full(b.k, 1.0 / b.k)
    theta = np.zeros((b.n_x, b.k))
    steps = 0
    while steps < outer:
        steps += 1
        used = zeta
        theta, _ = minimiser(theta, np.broadcast_to(np.log(used), (b.n_x, b.k)))
        zeta = marginal(b, softmax(theta))
        if np.max(np.abs(zeta - used)) < tol:
            break
    return softmax(theta), zeta, steps, used


# ---- gradient-descent trajectories ---------------------------------------------------------


@_x64
def descent_trace(loss, theta0, log_prior, *, steps: int, lr: float, record):
    """Plain gradient descent θ ← θ − lr ∇f; ``record(theta) -> array`` at every step."""
    grad = jax.grad(loss)
    lp = jnp.asarray(np.asarray(log_prior, np.float64))

    @jax.jit
    def run(theta):
        def body(theta, _):
            theta = theta - lr * grad(theta, lp)
            return theta, record(theta)

        return jax.lax.scan(body, theta, None, length=steps)

    theta, trace = run(jnp.asarray(np.asarray(theta0, np.float64)))
    return np.asarray(theta), np.asarray(trace)


def joint_loss(b: Bandit, cfg):
    """``f(theta, phi)``: population J_MI-DPO with OUR learnable prior ζ_φ = softmax(φ)
    (prior ``learned``) plus, when ``cfg.mi_weight`` > 0, the MI term on the exact policy
    marginal (sample weights p_π, constants of the ζ-step as in the trainer)."""
    xs, win, lose, weight = bt_pairs(b)
    ref_pairs = np.stack([np.log(b.ref)[xs, win], np.log(b.ref)[xs, lose]], -1)
    mask = jnp.ones((1, 2, 1))
    mi = cfg.mi_weight > 0

    def loss(theta, phi):
        logpi = jax.nn.log_softmax(theta, axis=-1)
        log_zeta = jax.nn.log_softmax(phi)
        pol = jnp.stack([logpi[xs, win], logpi[xs, lose]], axis=-1)
        pri = jnp.stack([log_zeta[win], log_zeta[lose]], axis=-1)
        extra = {}
        if mi:
            p_marg = jnp.sum(jnp.asarray(b.rho)[:, None] * jnp.exp(logpi), axis=0)
            extra = dict(
                prior_samples=log_zeta[:, None],
                prior_samples_mask=jnp.ones((b.k, 1)),
                prior_samples_weight=jax.lax.stop_gradient(p_marg),
            )

        def one(pol2, ref2, pri2):
            inputs = TokenInputs(
                policy=pol2[None, :, None],
                mask=mask,
                reference=ref2[None, :, None],
                prior=pri2[None, :, None],
                **extra,
            )
            return mipo_loss(inputs, cfg)[0]

        per_pair = jax.vmap(one)(pol, jnp.asarray(ref_pairs), pri)
        return jnp.sum(jnp.asarray(weight) * per_pair)

    return loss


@_x64
def joint_descent(loss, theta0, phi0, *, steps=4000, lr=2.0, momentum=0.9):
    """Heavy-ball descent on (θ, φ) jointly, as a trainer would (no alternation)."""
    grad = jax.grad(loss, argnums=(0, 1))

    @jax.jit
    def run(theta, phi):
        def body(carry, _):
            theta, phi, v_t, v_p = carry
            g_t, g_p = grad(theta, phi)
            v_t, v_p = momentum * v_t - lr * g_t, momentum * v_p - lr * g_p
            return (theta + v_t, phi + v_p, v_t, v_p), None

        zeros = (jnp.zeros_like(theta), jnp.zeros_like(phi))
        (theta, phi, *_), _ = jax.lax.scan(body, (theta, phi, *zeros), None, length=steps)
        return theta, phi

    theta, phi = run(jnp.asarray(theta0, jnp.float64), jnp.asarray(phi0, jnp.float64))
    return np.asarray(theta), np.asarray(phi)
