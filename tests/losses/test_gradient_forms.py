"""Spec §3.3: closed-form gradients w.r.t. per-token policy log-probs, against jax.grad.

The loss is the mean over B pairs, so every per-pair closed form carries a factor 1/B. With
z the pair's logit, the per-token gradients are (index 0 chosen, 1 rejected):
  DPO      ∂L/∂ℓ^π_t(y_{w,l}) = ∓ β σ(−z) m_t / B,            z = β h;
  SimPO    ∂L/∂ℓ^π_t(y_{w,l}) = ∓ (β/|y|) σ(−z_S) m_t / B,     z_S = β(A_w − A_l) − γ;
  IPO      ∂L/∂ℓ^π_t(y_{w,l}) = ± 2(h − 1/(2τ)) m_t / (|y| B), h on token-mean log-ratios;
  cDPO     ∂L/∂ℓ^π_t(y_{w,l}) = ± β(σ(z) − (1 − ε)) m_t / B,   zero at h* = log((1−ε)/ε)/β.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import cdpo, dpo, ipo, simpo
from mipo_jax.losses import mipo_loss
from mipo_jax.types import TokenInputs
from tests.reference import cases as C
from tests.reference import fixture

TOL = 1e-12
SIGN = np.array([-1.0, 1.0])[None, :, None]  # ∓: chosen pushed up, rejected down


@pytest.fixture(autouse=True)
def x64():
    with jax.enable_x64(True):
        yield


@pytest.fixture
def batch():
    """Per-token log-probs in (−3, 0) on the harness masks (uneven lengths, offsets)."""
    rng = np.random.default_rng(7)
    m = fixture.make(0).m
    policy = -rng.uniform(0.05, 3.0, m.shape)
    reference = -rng.uniform(0.05, 3.0, m.shape)
    return policy, reference, m


def sigma(x):
    return 1.0 / (1.0 + np.exp(-x))


def _grad(loss_cfg, policy, reference, m, loss=None):
    inputs = TokenInputs(
        policy=jnp.asarray(policy), mask=jnp.asarray(m), reference=jnp.asarray(reference)
    )
    loss = loss or (lambda i, c: mipo_loss(i, c)[0])
    value, g = jax.value_and_grad(lambda p: loss(inputs.replace(policy=p), loss_cfg))(inputs.policy)
    return float(value), np.asarray(g)


def _h(policy, reference, m, per_token=False):
    rho = ((policy - reference) * m).sum(-1)
    if per_token:
        rho = rho / m.sum(-1)
    return rho[:, 0] - rho[:, 1]


def test_dpo_weights(batch):
    policy, reference, m = batch
    cfg = dpo.get_config().loss
    beta, B = cfg.alpha, m.shape[0]
    z = beta * _h(policy, reference, m)
    value, g = _grad(cfg, policy, reference, m)
    assert abs(value - np.mean(np.log1p(np.exp(-z)))) < TOL
    expected = SIGN * (beta * sigma(-z) / B)[:, None, None] * m
    np.testing.assert_allclose(g, expected, atol=TOL, rtol=0)


def test_dpo_at_reference_is_log2_with_half_weights(batch):
    _, reference, m = batch
    cfg = dpo.get_config().loss
    value, g = _grad(cfg, reference, reference, m)
    assert abs(value - np.log(2.0)) < TOL
    np.testing.assert_allclose(g, SIGN * cfg.alpha / 2.0 / m.shape[0] * m, atol=TOL, rtol=0)


@pytest.mark.parametrize("mapping", ["i", "ii"])
def test_simpo_per_token_weights(batch, mapping):
    policy, _, m = batch
    config = simpo.get_config(f"mapping={mapping}")
    beta, gamma, B = config.loss.alpha, config.loss.alpha * config.gamma_beta_ratio, m.shape[0]
    n = m.sum(-1)
    avg = (policy * m).sum(-1) / n
    z = beta * (avg[:, 0] - avg[:, 1]) - gamma
    value, g = _grad(config.loss, policy, np.zeros_like(policy), m)
    assert abs(value - np.mean(np.log1p(np.exp(-z)))) < TOL
    expected = SIGN * (beta * sigma(-z) / B)[:, None, None] / n[:, :, None] * m
    np.testing.assert_allclose(g, expected, atol=TOL, rtol=0)


def test_simpo_ii_with_stopped_prior_has_the_wrong_gradient(batch):
    """Spec §2.4(c): with sg(ζ) the loss still matches but the per-token weight is α σ(−z), not
    (β/|y|) σ(−z): mapping (ii) is exact only with the gradient flowing through ζ."""
    policy, _, m = batch
    config = simpo.get_config("mapping=ii")
    beta, gamma, B = config.loss.alpha, config.loss.alpha * config.gamma_beta_ratio, m.shape[0]
    n = m.sum(-1)
    avg = (policy * m).sum(-1) / n
    z = beta * (avg[:, 0] - avg[:, 1]) - gamma
    value, g = _grad(config.loss, policy, np.zeros_like(policy), m, loss=C.loss_with_frozen_prior)
    assert abs(value - np.mean(np.log1p(np.exp(-z)))) < TOL
    np.testing.assert_allclose(
        g, SIGN * (beta * sigma(-z) / B)[:, None, None] * m, atol=TOL, rtol=0
    )


def test_ipo_gradient(batch):
    policy, reference, m = batch
    cfg = ipo.get_config().loss
    tau, B = cfg.alpha, m.shape[0]
    h = _h(policy, reference, m, per_token=True)
    value, g = _grad(cfg, policy, reference, m)
    assert abs(value - np.mean((h - 1.0 / (2.0 * tau)) ** 2)) < TOL
    dh = 2.0 * (h - 1.0 / (2.0 * tau)) / B
    expected = -SIGN * dh[:, None, None] / m.sum(-1)[:, :, None] * m
    np.testing.assert_allclose(g, expected, atol=TOL, rtol=0)


def test_cdpo_gradient_and_its_zero(batch):
    policy, reference, m = batch
    cfg = cdpo.get_config().loss
    beta, eps, B = cfg.alpha, cfg.label_smoothing, m.shape[0]
    z = beta * _h(policy, reference, m)
    _, g = _grad(cfg, policy, reference, m)
    expected = -SIGN * (beta * (sigma(z) - (1.0 - eps)) / B)[:, None, None] * m
    np.testing.assert_allclose(g, expected, atol=TOL, rtol=0)
    # Move every pair to h* = (1/β) log((1−ε)/ε) by shifting its chosen tokens evenly.
    h_star = np.log((1.0 - eps) / eps) / beta
    shift = (h_star - _h(policy, reference, m)) / m[:, 0].sum(-1)
    at_star = policy.copy()
    at_star[:, 0] += shift[:, None] * m[:, 0]
    np.testing.assert_allclose(_h(at_star, reference, m), h_star, atol=1e-12, rtol=0)
    value_star, g_star = _grad(cfg, at_star, reference, m)
    assert np.max(np.abs(g_star)) < TOL
    for delta in (-1e-3, 1e-3):  # a minimum along h, not just a stationary point
        moved = at_star.copy()
        moved[:, 0] += delta * m[:, 0] / m[:, 0].sum(-1, keepdims=True)
        assert _grad(cfg, moved, reference, m)[0] > value_star
