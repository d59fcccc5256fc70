"""The ground truths of the bandit reproductions against independent float64 brute force.

`experiments.bandit` supplies the closed forms the reproductions measure distances to: the
Gibbs policy ζ e^{r/α}/Z, the Blahut–Arimoto fixed point (the reward–mutual-information
curve), the Bayes risk. Here each is recomputed without them: direct numerical maximisation
of the objective it solves (scipy L-BFGS-B with finite differences over the logits, NumPy
only), and the population DPO loss written out pair by pair.
"""

import itertools

import jax
import numpy as np
import pytest
import scipy.optimize

from experiments import bandit as B

ALPHA = 0.7


def _softmax(theta):
    e = np.exp(theta - theta.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _maximise(objective, shape, starts=3, seed=0):
    """Best of a few L-BFGS-B runs of −objective(softmax(θ)), finite-difference gradients."""
    rng = np.random.default_rng(seed)
    best = None
    for _ in range(starts):
        res = scipy.optimize.minimize(
            lambda v: -objective(_softmax(v.reshape(shape))),
            rng.normal(size=int(np.prod(shape))),
            method="L-BFGS-B",
            options=dict(ftol=1e-15, gtol=1e-10, maxiter=5000),
        )
        if best is None or res.fun < best.fun:
            best = res
    return _softmax(best.x.reshape(shape)), -best.fun


def _mi(rho, pi):
    """I(X;Y) = Σ_x ρ Σ_y π log(π / p), p = Σ_x ρ π (KL form; B uses the entropy form)."""
    p = rho @ pi
    return float(np.sum(rho[:, None] * pi * np.log(pi / p[None, :])))


@pytest.fixture(scope="module")
def bandit():
    return B.make_bandit(2, n_x=3, k=3)  # BA marginals with full support at every α below


def test_gibbs_policy_maximises_the_prior_regularised_objective(bandit):
    b = bandit
    zeta = np.random.default_rng(5).dirichlet(np.ones(b.k))
    for log_base in (np.log(b.ref), np.broadcast_to(np.log(zeta), (b.n_x, b.k))):

        def objective(pi, log_base=log_base):
            return float(np.sum(b.rho * np.sum(pi * (b.r - ALPHA * (np.log(pi) - log_base)), -1)))

        pi, value = _maximise(objective, (b.n_x, b.k))
        closed = B.gibbs(log_base, b.r, ALPHA)
        assert np.max(np.abs(pi - closed)) < 1e-5
        # value identity F(π*) = α Σ_x ρ log Z(x)
        log_z = np.log(np.sum(np.exp(log_base + b.r / ALPHA), -1))
        assert abs(objective(closed) - ALPHA * np.sum(b.rho * log_z)) < 1e-12
        assert value <= objective(closed) + 1e-12


@pytest.mark.parametrize("alpha", [0.3, ALPHA, 2.0])
def test_blahut_arimoto_fixed_point_maximises_reward_minus_mutual_information(bandit, alpha):
    """E[r] − α I(π) is concave in π; BA must match a direct maximisation, and satisfy the
    rate–distortion optimality certificate c(y) = Σ_x ρ e^{r/α}/Z(x) ≤ 1, = 1 where ζ(y) > 0
    (Z(x) = Σ_y ζ(y) e^{r/α}): a global optimum even where ζ has zeros (logits can't reach)."""
    b = bandit
    pi_ba, zeta, _ = B.blahut_arimoto(b, alpha)
    objective = lambda pi: float(np.sum(b.rho * np.sum(pi * b.r, -1))) - alpha * _mi(b.rho, pi)
    pi, value = _maximise(objective, (b.n_x, b.k), seed=1)
    assert objective(pi_ba) >= value - 1e-10  # never beaten by direct maximisation
    e = np.exp(b.r / alpha)
    c = np.sum(b.rho[:, None] * e / (e @ zeta)[:, None], 0)
    assert np.all(c <= 1 + 1e-9)
    np.testing.assert_allclose(c[zeta > 1e-8], 1.0, atol=1e-9)
    if zeta.min() > 1e-3:  # interior optimum: the direct maximisation reaches it
        assert abs(value - objective(pi_ba)) < 1e-8
        assert np.max(np.abs(pi - pi_ba)) < 1e-3
    np.testing.assert_allclose(zeta, b.rho @ pi_ba, atol=1e-13)  # ζ = p_π at the fixed point
    assert abs(_mi(b.rho, pi_ba) - B.mutual_information(b, pi_ba)) < 1e-12


def test_blahut_arimoto_points_trace_the_upper_frontier(bandit):
    """Each BA point beats every random policy on E[r] − α I, and the curve (I, E[r]) is
    increasing and concave with slope α: the reward–information (rate–distortion) curve."""
    b = bandit
    alphas = np.geomspace(0.1, 3.0, 15)[::-1]
    points = []
    rng = np.random.default_rng(9)
    randoms = rng.dirichlet(np.full(b.k, 0.5), size=(2000, b.n_x))
    rand_r = np.einsum("x,nxk,xk->n", b.rho, randoms, b.r)
    rand_i = np.array([_mi(b.rho, p) for p in randoms])
    for alpha in alphas:
        pi, _, _ = B.blahut_arimoto(b, alpha)
        i, r = _mi(b.rho, pi), float(np.sum(b.rho * np.sum(pi * b.r, -1)))
        assert np.all(rand_r - alpha * rand_i <= r - alpha * i + 1e-12)
        points.append((i, r))
    i, r = np.array(points).T
    assert np.all(np.diff(i) > 0) and np.all(np.diff(r) > 0)
    slopes = np.diff(r) / np.diff(i)
    assert np.all(np.diff(slopes) < 1e-9)  # concave
    # point k maximises E − α_k I, so the chord slope between k and k+1 lies in [α_{k+1}, α_k]
    assert np.all(slopes <= alphas[:-1] + 1e-9) and np.all(slopes >= alphas[1:] - 1e-9)


def test_bayes_risk_and_population_loss_through_mipo_loss(bandit):
    """At π* = π_ref e^{r/α}/Z the population DPO loss (NumPy, pair by pair) is the Bayes
    risk, and OUR mipo_loss path (`bandit.pair_loss`) gives the same number at any π."""
    b = bandit
    star = B.gibbs(np.log(b.ref), b.r, ALPHA)

    def numpy_loss(pi):
        total = 0.0
        for x in range(b.n_x):
            for y1 in range(b.k):
                for y2 in range(b.k):
                    w = b.rho[x] * b.mu[x, y1] * b.mu[x, y2]
                    p = 1 / (1 + np.exp(-(b.r[x, y1] - b.r[x, y2])))
                    h = np.log(pi[x, y1] / b.ref[x, y1]) - np.log(pi[x, y2] / b.ref[x, y2])
                    z = ALPHA * h
                    total += w * (p * np.logaddexp(0, -z) + (1 - p) * np.logaddexp(0, z))
        return total

    assert abs(numpy_loss(star) - B.bayes_risk(b)) < 1e-13
    loss = B.pair_loss(B.make_cfg(ALPHA), B.bt_pairs(b))
    other = np.random.default_rng(2).dirichlet(np.ones(b.k), size=b.n_x)
    with jax.enable_x64(True):
        for pi in (star, other):
            ours = float(loss(np.log(pi), np.log(b.ref)))
            assert abs(ours - numpy_loss(pi)) < 1e-13


def test_ipo_margin_ratio_matches_least_squares_over_every_completion():
    """`ipo_vs_dpo.ipo_margin_ratio` solves IPO's population problem on reward levels; here the
    same least squares over every single completion (3-word completions of the controlled
    task's Markov chain, 512 of them), from its normal equations."""
    from experiments.ipo_vs_dpo.run import ipo_margin_ratio
    from mipo_jax.data.tasks import sentiment as S

    m = S.transition()
    ys = list(itertools.product(range(8), repeat=3))
    for last in (0, 5):
        p = np.array([m[last, y[0]] * m[y[0], y[1]] * m[y[1], y[2]] for y in ys])
        r = np.array([S.SENTIMENT[list(y)].sum() for y in ys])
        above = (r[:, None] > r[None, :]).astype(float)  # i chosen over j
        w = p[:, None] * p[None, :] * (above + above.T)  # every untied pair, either order
        lap = np.diag(w.sum(1)) - w
        rhs = (p[:, None] * p[None, :] * (above - above.T)).sum(1)  # target c = 1
        f = np.linalg.lstsq(lap, rhs, rcond=None)[0]
        h = f[:, None] - f[None, :]
        brute = np.sum(p[:, None] * p[None, :] * above * h) / np.sum(
            p[:, None] * p[None, :] * above
        )
        assert abs(brute - ipo_margin_ratio(np.log(p), r)) < 1e-10
        assert 0.5 < brute < 1.0  # overlapping comparisons: below the isolated-pair 1/(2τ)
