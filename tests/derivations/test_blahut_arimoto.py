"""Spec §1.2, §1.5, §3.7: the MI joint prior, Blahut–Arimoto, and the learnable prior.

F(π, ζ) = E[r] − α E_x KL(π(·|x) ‖ ζ) with α = 1/β_MI. Blahut–Arimoto alternates
π ∝ ζ e^{r/α} and ζ ← p_π = Σ_x ρ π. J_MI-DPO alone sees (π, ζ) only through log π − log ζ,
so it has a manifold of minimisers; the MI term pins ζ to p_π and picks the BA point.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mipo_jax.losses import loss_config, mipo_loss, validate
from mipo_jax.types import TokenInputs
from tests.derivations import util as U

BETA_MI = 3.0
ALPHA = 1.0 / BETA_MI
OPT_TOL = 1e-6
ID_TOL = 1e-12


@pytest.fixture(autouse=True, scope="module")
def _x64():
    with jax.enable_x64(True):
        yield


@pytest.fixture(scope="module")
def bandit():
    """Response k suits prompt k (plus noise): the BA marginal then has full support, which a
    softmax-parametrised ζ needs (for very small or very large β_MI, BA marginals have zeros)."""
    rng = np.random.default_rng(11)
    r = np.eye(4) + 0.3 * rng.normal(size=(4, 4))
    b = U.make_bandit(11, n_x=4, k=4, r=r)
    return U.Bandit(rho=b.rho, r=b.r, ref=b.ref, mu=np.full((4, 4), 0.25))


@pytest.fixture(scope="module")
def ba(bandit):
    pi, zeta, history = U.blahut_arimoto(bandit, BETA_MI)
    assert np.min(zeta) > 0.05, "test bandit must have a full-support BA marginal"
    return pi, zeta, history


def _cfg(mi_weight=0.0):
    cfg = loss_config("learned")
    cfg.alpha, cfg.mi_weight = ALPHA, mi_weight
    validate(cfg)
    return cfg


def _mi_objective(b, pi):
    """max_ζ F(π, ζ) = E[r] − α I_π(X;Y)."""
    return float(np.sum(b.rho * np.sum(pi * b.r, -1)) - ALPHA * U.mutual_information(b.rho, pi))


def test_ba_objective_non_decreasing(bandit):
    rng = np.random.default_rng(12)
    for zeta0 in (None, rng.dirichlet(np.ones(bandit.k)), rng.dirichlet(np.full(bandit.k, 0.3))):
        _, _, history = U.blahut_arimoto(bandit, BETA_MI, zeta0=zeta0)
        assert np.all(np.diff(history) >= -1e-14)  # every half-step maximises one block
        assert history[-1] > history[0]


def test_ba_fixed_point_rate_equals_mutual_information(bandit, ba):
    pi, zeta, _ = ba
    np.testing.assert_allclose(bandit.rho @ pi, zeta, rtol=0, atol=1e-14)  # ζ = p_π
    np.testing.assert_allclose(pi, U.gibbs(np.log(zeta)[None, :], bandit.r, ALPHA), 0, 1e-14)
    rate = np.sum(bandit.rho * U.kl(pi, zeta[None, :]))
    assert abs(rate - U.mutual_information(bandit.rho, pi)) < ID_TOL


def test_rate_decomposes_into_mi_plus_marginal_kl(bandit):
    """E_x KL(π‖ζ) = I_π(X;Y) + KL(p_π‖ζ) for any π and ζ (mathematics §1.2)."""
    rng = np.random.default_rng(13)
    for _ in range(5):
        pi = rng.dirichlet(np.ones(bandit.k), size=bandit.n_x)
        zeta = rng.dirichlet(np.ones(bandit.k))
        rate = np.sum(bandit.rho * U.kl(pi, zeta[None, :]))
        mi, marginal_kl = U.mutual_information(bandit.rho, pi), U.kl(bandit.rho @ pi, zeta)
        assert abs(rate - (mi + marginal_kl)) < ID_TOL
        assert marginal_kl > 0


def test_population_midpo_with_frozen_ba_prior_recovers_ba_policy(bandit, ba):
    pi_ba, zeta_ba, _ = ba
    loss = U.population_loss(bandit, _cfg(), prior=np.log(zeta_ba))
    theta = U.bfgs(lambda v: loss(v.reshape(bandit.n_x, bandit.k)), np.zeros(bandit.n_x * bandit.k))
    assert np.max(np.abs(U.softmax(theta.reshape(bandit.n_x, bandit.k)) - pi_ba)) < OPT_TOL


def _loss_at(bandit, cfg, log_pi, log_zeta, mi):
    loss = U.population_loss(bandit, cfg, prior="param", mi=mi)
    return float(loss(jnp.asarray(log_pi), jnp.asarray(log_zeta)))


def test_manifold_of_minimisers_split_by_the_mi_term(bandit, ba):
    """Every ζ gives π_ζ ∝ ζ e^{r/α} at the Bayes risk; only the MI objective ranks them."""
    pi_ba, zeta_ba, _ = ba
    risk = U.bayes_risk(bandit)
    zetas = [zeta_ba] + list(np.random.default_rng(14).dirichlet(np.ones(bandit.k), size=3))
    mi_values = []
    for zeta in zetas:
        pi = U.gibbs(np.log(zeta)[None, :], bandit.r, ALPHA)
        log_pi, log_zeta = np.log(pi), np.log(zeta)
        j = _loss_at(bandit, _cfg(), log_pi, log_zeta, mi=False)
        assert abs(j - risk) < ID_TOL  # J_MI-DPO cannot tell the ζ apart
        # OUR MI term adds λ·CE(p_π, ζ) = λ[H(p_π) + KL(p_π‖ζ)].
        lam = 0.5
        with_mi = _loss_at(bandit, _cfg(lam), log_pi, log_zeta, mi=True)
        p_marg = bandit.rho @ pi
        marginal_kl = (with_mi - j) / lam - U.entropy(p_marg)
        assert abs(marginal_kl - U.kl(p_marg, zeta)) < ID_TOL
        mi_values.append(_mi_objective(bandit, pi))
        if zeta is not zeta_ba:
            assert marginal_kl > 1e-3
    assert abs(U.kl(bandit.rho @ pi_ba, zeta_ba)) < ID_TOL
    assert all(mi_values[0] > v + 1e-4 for v in mi_values[1:])  # the BA point is the best


def _joint_descent(bandit, mi_weight, steps=2000, lr=5.0, momentum=0.9, mi_sg=True):
    loss = U.population_loss(bandit, _cfg(mi_weight), prior="param", mi=mi_weight > 0, mi_sg=mi_sg)
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

    return run


def test_learnable_prior_is_well_posed_only_with_the_mi_term(bandit, ba):
    """Joint minimisation of J_MI-DPO(π, ζ_φ) [+ λ·MI term] over tabular θ and φ.

    With the MI term every initial ζ leads to the BA point (π_BA, ζ_BA = p_π). Without it
    the descent stops on the manifold π ∝ ζ e^{r/α} at a ζ set by the initial one: J depends
    on θ_x − φ only, so Σ_x θ_x + φ is conserved along the descent and the end point is
    log ζ = log_softmax((Σ_x θ⁰_x + φ⁰ − Σ_x r_x/α) / (n_X + 1)).
    """
    pi_ba, zeta_ba, _ = ba
    rng = np.random.default_rng(15)
    inits = [
        (rng.normal(size=(bandit.n_x, bandit.k)), 2.0 * rng.normal(size=bandit.k)) for _ in range(2)
    ]
    risk = U.bayes_risk(bandit)
    with_mi, without = _joint_descent(bandit, 1.0), _joint_descent(bandit, 0.0)
    finals = []
    for theta0, phi0 in inits:
        theta, phi = (np.asarray(a) for a in with_mi(jnp.asarray(theta0), jnp.asarray(phi0)))
        pi, zeta = U.softmax(theta), U.softmax(phi)
        assert np.max(np.abs(pi - pi_ba)) < OPT_TOL and np.max(np.abs(zeta - zeta_ba)) < OPT_TOL
        assert np.max(np.abs(zeta - bandit.rho @ pi)) < OPT_TOL  # ζ = p_π

        theta, phi = (np.asarray(a) for a in without(jnp.asarray(theta0), jnp.asarray(phi0)))
        pi, zeta = U.softmax(theta), U.softmax(phi)
        conserved = np.sum(theta0, 0) + phi0
        zeta_pred = U.softmax((conserved - np.sum(bandit.r, 0) / ALPHA) / (bandit.n_x + 1))
        assert np.max(np.abs(zeta - zeta_pred)) < OPT_TOL
        assert np.max(np.abs(pi - U.gibbs(np.log(zeta_pred)[None, :], bandit.r, ALPHA))) < OPT_TOL
        assert abs(_loss_at(bandit, _cfg(), np.log(pi), np.log(zeta), mi=False) - risk) < 1e-10
        finals.append(pi)
    assert np.max(np.abs(finals[0] - finals[1])) > 1e-2  # the end point depends on ζ⁰
    assert np.max(np.abs(finals[0] - pi_ba)) > 1e-2


def test_mi_sample_weights_are_constants(bandit, ba):
    """The MI term treats sample weights as constants (sampling weights of the ζ-step).

    Were p_π a differentiable weight, the π-gradient would be ∇_π CE(p_π, ζ), rewarding
    p_π piled onto high-ζ responses, and joint descent would collapse to ζ ≈ one-hot far below
    the BA point. So: the weight gradient is exactly zero, and joint descent WITHOUT the
    test's own stop-gradient still reaches the BA point."""
    pi_ba, zeta_ba, _ = ba
    rng = np.random.default_rng(7)
    n, t = 5, 3
    inputs = lambda w: TokenInputs(
        policy=jnp.zeros((1, 2, 1)),
        mask=jnp.ones((1, 2, 1)),
        prior=jnp.zeros((1, 2, 1)),
        prior_samples=jnp.asarray(-rng.exponential(size=(n, t))),
        prior_samples_mask=jnp.ones((n, t)),
        prior_samples_weight=w,
    )
    with jax.enable_x64(True):
        grad = jax.grad(lambda w: mipo_loss(inputs(w), _cfg(1.0))[0])(jnp.full((n,), 0.2))
    assert np.all(np.asarray(grad) == 0.0)
    run = _joint_descent(bandit, 1.0, mi_sg=False)
    theta, phi = (
        np.asarray(a) for a in run(jnp.zeros((bandit.n_x, bandit.k)), jnp.zeros(bandit.k))
    )
    assert np.max(np.abs(U.softmax(theta) - pi_ba)) < OPT_TOL
    assert np.max(np.abs(U.softmax(phi) - zeta_ba)) < OPT_TOL


def test_mi_term_value_is_prior_cross_entropy_on_samples():
    """The MI term alone: mi_weight · (−Σ_n w_n log ζ(y_n)) / Σ_n w_n (mathematics §1.5 ζ-step)."""
    rng = np.random.default_rng(16)
    n, t = 6, 3
    samples = -rng.exponential(size=(n, t))
    smask = (rng.random((n, t)) < 0.7).astype(float)
    weights = rng.dirichlet(np.ones(n))
    base = TokenInputs(
        policy=jnp.zeros((1, 2, 1)), mask=jnp.ones((1, 2, 1)), prior=jnp.zeros((1, 2, 1))
    )
    cfg = _cfg(0.3)
    with_mi = base.replace(
        prior_samples=jnp.asarray(samples),
        prior_samples_mask=jnp.asarray(smask),
        prior_samples_weight=jnp.asarray(weights),
    )
    diff = float(mipo_loss(with_mi, cfg)[0] - mipo_loss(base, _cfg())[0])
    expected = 0.3 * -np.sum(weights * np.sum(samples * smask, -1)) / np.sum(weights)
    assert abs(diff - expected) < ID_TOL
