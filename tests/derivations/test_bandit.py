"""Spec §3.1, §3.2, §3.4, §3.6, §3.8 on enumerable bandits, in float64.

Every expected number comes from a closed form written in the test; the population losses
are evaluated by OUR ``mipo_loss`` (pair by pair, weighted) and differentiated by jax.grad.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mipo_jax.losses import loss_config, mipo_loss, validate
from mipo_jax.types import TokenInputs
from tests.derivations import util as U

BETA = 0.5  # DPO β (= our alpha); the regularised objective is E r − β KL (mathematics §3.1)
OPT_TOL = 1e-6  # mathematics §3.1: numerical optimisation must reach the closed form to 1e-6
ID_TOL = 1e-12  # exact identities, float64 rounding only


@pytest.fixture(autouse=True, scope="module")
def _x64():
    with jax.enable_x64(True):
        yield


@pytest.fixture(scope="module")
def bandit():
    return U.make_bandit(0, n_x=3, k=5)


def _cfg(prior="reference", alpha=BETA, links=("sigmoid",), **params):
    cfg = loss_config(prior, **params)
    cfg.alpha, cfg.links = alpha, links
    validate(cfg)
    return cfg


def _minimise_policy(b, loss):
    theta = U.bfgs(lambda v: loss(v.reshape(b.n_x, b.k)), np.zeros(b.n_x * b.k))
    return U.softmax(theta.reshape(b.n_x, b.k))


# ---------------------------------------------------------------- §3.1 KL-regularised optimum


def test_kl_regularised_optimum_identities(bandit):
    b, log_ref = bandit, np.log(bandit.ref)
    pi_star = U.gibbs(log_ref, b.r, BETA)
    log_z = np.log(np.sum(b.ref * np.exp(b.r / BETA), axis=-1))
    f_star = U.reward_objective(b, pi_star, log_ref, BETA)
    # Value identity: F(π*) = β Σ_x ρ(x) log Z(x).
    assert abs(f_star - BETA * np.sum(b.rho * log_z)) < ID_TOL
    # Gap identity: F(π*) − F(π) = β E_x KL(π ‖ π*) for any π.
    rng = np.random.default_rng(1)
    for _ in range(5):
        pi = rng.dirichlet(np.ones(b.k), size=b.n_x)
        gap = f_star - U.reward_objective(b, pi, log_ref, BETA)
        assert abs(gap - BETA * np.sum(b.rho * U.kl(pi, pi_star))) < ID_TOL
        assert gap > 0


def test_kl_regularised_numerical_maximisation(bandit):
    b = bandit
    rho, r, log_ref = (jnp.asarray(a) for a in (b.rho, b.r, np.log(b.ref)))

    def neg_f(v):
        logpi = jax.nn.log_softmax(v.reshape(b.n_x, b.k), axis=-1)
        per_x = jnp.sum(jnp.exp(logpi) * (r - BETA * (logpi - log_ref)), axis=-1)
        return -jnp.sum(rho * per_x)

    theta = U.bfgs(neg_f, np.zeros(b.n_x * b.k))
    pi = U.softmax(theta.reshape(b.n_x, b.k))
    assert np.max(np.abs(pi - U.gibbs(np.log(b.ref), b.r, BETA))) < OPT_TOL


# ---------------------------------------------------------------- §3.2 population DPO


def test_population_dpo_recovers_optimum_and_bayes_risk(bandit):
    b = bandit
    loss = U.population_loss(b, _cfg())
    pi_star = U.gibbs(np.log(b.ref), b.r, BETA)
    risk = U.bayes_risk(b)
    # At π* the loss is exactly the Bayes risk E[H_b(σ(Δr))] ...
    assert abs(float(loss(jnp.asarray(np.log(pi_star)))) - risk) < ID_TOL
    # ... a random policy does worse ...
    rng = np.random.default_rng(2)
    assert float(loss(jnp.asarray(rng.normal(size=(b.n_x, b.k))))) > risk
    # ... and BFGS on OUR loss from θ = 0 recovers π* and L_min = Bayes risk.
    pi = _minimise_policy(b, loss)
    assert np.max(np.abs(pi - pi_star)) < OPT_TOL
    assert abs(float(loss(jnp.asarray(np.log(pi)))) - risk) < ID_TOL


def test_population_midpo_fixed_prior_recovers_gibbs(bandit):
    """MI-DPO, fixed prompt-free ζ, α = 1/β_MI: minimiser ∝ ζ e^{r/α} (mathematics §3.2)."""
    b, alpha = bandit, 0.7
    log_zeta = U.log_softmax(np.random.default_rng(3).normal(size=b.k))
    loss = U.population_loss(b, _cfg("learned", alpha=alpha), prior=log_zeta)
    pi = _minimise_policy(b, loss)
    assert np.max(np.abs(pi - U.gibbs(log_zeta[None, :], b.r, alpha))) < OPT_TOL
    assert abs(float(loss(jnp.asarray(np.log(pi)))) - U.bayes_risk(b)) < ID_TOL


# ---------------------------------------------------------------- §3.4 H-DPO


def _hdpo_optimum(b, a, beta=BETA):
    """π*_a ∝ (π_ref e^{r/β})^{1/a}: a Gibbs law with energy E = −(β log π_ref + r), T = aβ."""
    return U.softmax((np.log(b.ref) + b.r / beta) / a)


@pytest.mark.parametrize("a", [0.7, 1.5])
def test_hdpo_population_optimum(bandit, a):
    b = bandit
    cfg = _cfg("tempered_reference", alpha=a * BETA, temperature=a)
    pi = _minimise_policy(b, U.population_loss(b, cfg))
    assert np.max(np.abs(pi - _hdpo_optimum(b, a))) < OPT_TOL
    # The entropy of OUR minimiser moves with a as the closed form says (a = 1 is DPO).
    h_dpo = U.entropy(U.gibbs(np.log(b.ref), b.r, BETA))
    assert np.all(np.sign(U.entropy(pi) - h_dpo) == np.sign(a - 1.0))


def test_hdpo_entropy_monotone_with_closed_form_derivative(bandit):
    b = bandit
    energy = -(BETA * np.log(b.ref) + b.r)
    grid = np.linspace(0.05, 5.0, 200)
    h = np.array([U.entropy(_hdpo_optimum(b, a)) for a in grid])  # [A, X]
    assert np.all(np.diff(h, axis=0) > 0)  # strictly increasing in a, every prompt
    step = 1e-5
    for a in (0.25, 0.7, 1.0, 3.0):
        pi = _hdpo_optimum(b, a)
        var = np.sum(pi * energy**2, -1) - np.sum(pi * energy, -1) ** 2
        formula = var / (a**3 * BETA**2)  # dH/da = Var_π(E) / (a³β²)
        fd = (U.entropy(_hdpo_optimum(b, a + step)) - U.entropy(_hdpo_optimum(b, a - step))) / (
            2 * step
        )
        np.testing.assert_allclose(fd, formula, rtol=1e-7)
        assert np.all(formula > 0)
    # Limits: a = 1 is DPO's π*; a → ∞ is uniform; a → 0 is the argmax of π_ref e^{r/β}.
    np.testing.assert_allclose(_hdpo_optimum(b, 1.0), U.gibbs(np.log(b.ref), b.r, BETA), 0, 1e-14)
    np.testing.assert_allclose(U.entropy(_hdpo_optimum(b, 1e8)), np.log(b.k), 0, 1e-8)
    a_small, score = 1e-3, np.log(b.ref) + b.r / BETA
    top = np.sort(score, -1)
    bound = (b.k - 1) * np.exp(-(top[:, -1] - top[:, -2]) / a_small)  # 1 − π(argmax) ≤ this
    mass = _hdpo_optimum(b, a_small)[np.arange(b.n_x), np.argmax(score, -1)]
    assert np.all(1.0 - mass <= bound + 1e-15)


# ---------------------------------------------------------------- §3.6 deterministic prefs


def _single_pair_loss(cfg, log_ref):
    """Loss of the one pair (y_1 ≻ y_2) under a 2-arm tabular policy softmax(θ)."""

    def loss(theta):
        logpi = jax.nn.log_softmax(theta)
        inputs = TokenInputs(
            policy=logpi.reshape(1, 2, 1),
            mask=jnp.ones((1, 2, 1)),
            reference=jnp.asarray(log_ref).reshape(1, 2, 1),
        )
        return mipo_loss(inputs, cfg)[0]

    return loss


@pytest.mark.parametrize("tau", [0.1, 0.5, 2.0])
def test_ipo_deterministic_preferences_finite_minimiser(tau):
    for ref1 in (0.5, 0.2):  # uniform π_ref (IPO paper §5.3), then a skewed one
        log_ref = np.log([ref1, 1.0 - ref1])
        theta = U.bfgs(_single_pair_loss(_cfg(alpha=tau, links=("ipo",)), log_ref), np.zeros(2))
        expected = U.sigmoid(np.log(ref1 / (1.0 - ref1)) + 1.0 / (2.0 * tau))
        assert abs(U.softmax(theta)[0] - expected) < OPT_TOL


@pytest.mark.parametrize("beta", [0.1, 1.0, 10.0])
def test_dpo_deterministic_preferences_no_finite_minimiser(beta):
    loss = _single_pair_loss(_cfg(alpha=beta), np.log([0.5, 0.5]))
    d = np.linspace(0.0, 60.0 / beta, 400)  # d = θ_1 − θ_2 = log π(y1)/π(y2)
    vg = jax.jit(jax.vmap(jax.value_and_grad(lambda t: loss(jnp.stack([t / 2, -t / 2])))))
    values, grads = (np.asarray(a) for a in vg(jnp.asarray(d)))
    assert np.all(values > 0) and np.all(np.diff(values) < 0)  # strictly decreasing, inf 0
    np.testing.assert_allclose(grads, -beta * U.sigmoid(-beta * d), rtol=1e-12)
    assert np.all(grads < 0)  # no stationary point: π(y2) → 0


# ---------------------------------------------------------------- §3.8 finite-sample MLE


def _bt_logistic_regression(x, win, lose, n_x, k):
    """Independent BT MLE of per-arm rewards R[x, k] (R[x, 0] = 0) by Newton's method."""
    cols = [(i, j) for i in range(n_x) for j in range(1, k)]
    col = {c: n for n, c in enumerate(cols)}
    design = np.zeros((len(x), len(cols)))
    for row, (xi, wi, li) in enumerate(zip(x, win, lose)):
        if wi:
            design[row, col[(xi, wi)]] += 1.0
        if li:
            design[row, col[(xi, li)]] -= 1.0
    beta_hat = np.zeros(len(cols))
    for _ in range(100):
        p = U.sigmoid(design @ beta_hat)
        grad = -design.T @ (1.0 - p)
        if np.max(np.abs(grad)) < 1e-12:
            break
        hess = design.T @ (design * (p * (1.0 - p))[:, None])
        beta_hat -= np.linalg.solve(hess, grad)
    assert np.max(np.abs(grad)) < 1e-10, "BT MLE did not converge (separable data?)"
    rewards = np.zeros((n_x, k))
    for (i, j), v in zip(cols, beta_hat):
        rewards[i, j] = v
    nll = float(np.sum(np.logaddexp(0.0, -(design @ beta_hat))))
    return rewards, nll


def test_finite_sample_dpo_is_bt_mle():
    b = U.make_bandit(4, n_x=2, k=4)
    rng = np.random.default_rng(5)
    n = 400
    x = rng.choice(b.n_x, size=n, p=b.rho)
    y1 = rng.integers(0, b.k, n)
    y2 = (y1 + rng.integers(1, b.k, n)) % b.k  # y2 ≠ y1
    first_wins = rng.random(n) < U.sigmoid(b.r[x, y1] - b.r[x, y2])
    win, lose = np.where(first_wins, y1, y2), np.where(first_wins, y2, y1)
    log_ref = np.log(b.ref)
    ref = jnp.asarray(np.stack([log_ref[x, win], log_ref[x, lose]], -1)[..., None])
    cfg = _cfg()

    def loss(v):
        logpi = jax.nn.log_softmax(v.reshape(b.n_x, b.k), axis=-1)
        pol = jnp.stack([logpi[x, win], logpi[x, lose]], -1)[..., None]
        return mipo_loss(TokenInputs(policy=pol, mask=jnp.ones((n, 2, 1)), reference=ref), cfg)[0]

    theta = U.bfgs(loss, np.zeros(b.n_x * b.k))
    r_dpo = BETA * (U.log_softmax(theta.reshape(b.n_x, b.k)) - log_ref)
    r_mle, nll = _bt_logistic_regression(x, win, lose, b.n_x, b.k)
    centre = lambda a: a - a[:, :1]  # rewards are identified up to a per-x constant
    np.testing.assert_allclose(centre(r_dpo), centre(r_mle), rtol=0, atol=OPT_TOL)
    assert abs(float(loss(jnp.asarray(theta))) - nll / n) < 1e-10
