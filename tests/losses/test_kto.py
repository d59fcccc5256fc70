"""KTO against an independent float64 NumPy form of TRL's ``kto_loss`` (mathematics §2.14)."""

import jax
import numpy as np
import pytest

from mipo_jax.losses.kto import UnpairedInputs, kto_config, kto_loss


def numpy_kto(pol, ref, kl_pol, kl_ref, label, beta, wd, wu, loss_type):
    z0 = max(np.mean(kl_pol - kl_ref), 0.0)
    r = pol - ref
    sig = lambda x: 1.0 / (1.0 + np.exp(-x))
    if loss_type == "kto":
        good, bad = 1 - sig(beta * (r - z0)), 1 - sig(beta * (z0 - r))
    else:
        good, bad = 1 - sig(beta * r), sig(beta * r)
    losses = np.concatenate([wd * good[label == 1], wu * bad[label == 0]])
    return losses.mean(), z0


@pytest.mark.parametrize("loss_type", ["kto", "apo_zero_unpaired"])
def test_kto_matches_numpy(loss_type):
    rng = np.random.default_rng(0)
    n, t = 6, 5
    tok = lambda: rng.normal(size=(n, t)) - 2.0
    pol, ref, kpol, kref = tok(), tok(), tok() + 0.5, tok()
    mask = (np.arange(t)[None] < rng.integers(1, t + 1, size=(n, 1))).astype(float)
    label = np.array([1, 0, 1, 1, 0, 0], float)
    cfg = kto_config()
    cfg.loss_type, cfg.desirable_weight, cfg.undesirable_weight = loss_type, 1.3, 0.7
    with jax.enable_x64(True):
        inputs = UnpairedInputs(pol, mask, ref, label, kpol, kref, mask)
        loss, metrics = kto_loss(inputs, cfg)
        seq = lambda x: (x * mask).sum(-1)
        expected, z0 = numpy_kto(
            seq(pol), seq(ref), seq(kpol), seq(kref), label, 0.1, 1.3, 0.7, loss_type
        )
        np.testing.assert_allclose(float(loss), expected, rtol=1e-12)
        np.testing.assert_allclose(float(metrics["kl"].value), z0, rtol=1e-12)
        r = 0.1 * (seq(pol) - seq(ref))
        np.testing.assert_allclose(float(metrics["rewards/chosen"].value), r[label == 1].mean())


def test_kto_reference_point_is_detached():
    rng = np.random.default_rng(1)
    n, t = 4, 3
    mask = np.ones((n, t))
    kpol = rng.normal(size=(n, t)) + 3.0  # z0 > 0
    label = np.array([1, 0, 1, 0], float)
    args = dict(mask=mask, reference=np.zeros((n, t)), label=label, kl_reference=np.zeros((n, t)))
    grad = jax.grad(
        lambda k: kto_loss(
            UnpairedInputs(policy=np.zeros((n, t)), kl_policy=k, kl_mask=mask, **args),
            kto_config(),
        )[0]
    )(kpol)
    assert np.all(np.asarray(grad) == 0.0)


@pytest.mark.parametrize("mode", ["cached", "dataset"])
def test_kto_needs_a_live_reference(mode):
    """z_0's mismatched pairs change with every batch: no cache holds their reference."""
    from configs import kto
    from mipo_jax.train import checks

    config = kto.get_config("tiny")
    config.reference.mode = mode
    with pytest.raises(ValueError, match="reference.mode='live'"):
        checks.validate(config)
