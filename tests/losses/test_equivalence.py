"""Spec §2 harness: every algorithm's original formula equals MI-DPO with its mapped prior.

Originals: float64 NumPy in ``tests/reference/originals.py``, differentiated by the complex
step (exact, independent of JAX). MI-DPO: ``mipo_loss`` with the config from
``configs/<name>.py``, its inputs built from the same logits by ``mipo_jax.losses.logps``
inside the differentiated function, differentiated by ``jax.grad``. All under
``jax.enable_x64`` (a context, so other tests in the process keep float32).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mipo_jax.losses import loss_config, mipo_loss
from mipo_jax.losses.logps import token_logps
from mipo_jax.types import TokenInputs
from tests.reference import cases as C
from tests.reference import complex_step, fixture
from tests.reference import originals as O

LOSS_TOL, GRAD_TOL = 1e-10, 1e-9


@pytest.fixture(autouse=True)
def x64():
    with jax.enable_x64(True):
        yield


@pytest.fixture(scope="module")
def fx():
    return fixture.make(0)


@functools.cache
def _comparison(name):
    case = C.BY_NAME[name]
    with jax.enable_x64(True):
        return C.compare(case, C.load_config(case), fixture.make(0))


def case_params():
    return [pytest.param(case, id=case.name) for case in C.CASES]


def test_fixture_has_the_spec_lengths(fx):
    lengths = fx.m.sum(-1)
    np.testing.assert_array_equal(lengths, np.array(fixture.SPEC_LENGTHS))
    assert np.any(lengths[:, 0] == lengths[:, 1]) and np.any(lengths[:, 0] < lengths[:, 1])
    assert np.any(fx.m[:, :, 0] == 0), "some completions must start after a prompt"


@pytest.mark.parametrize("case", case_params())
def test_original_equals_mi_dpo(case):
    """|L_orig − L_MI| < 1e-10; max |∇L_orig − ∇L_MI| < 1e-9 w.r.t. policy logits, the
    reference (or previous-iterate) logits and any learned masks."""
    r = _comparison(case.name)
    assert r.dloss < LOSS_TOL, (r.loss_orig, r.loss_mi)
    assert np.max(np.abs(r.grad_orig["Lp"])) > 1e-3, "the policy gradient must not vanish"
    for name in case.compared:
        assert r.dgrad(name) < GRAD_TOL, name
    for name in case.extras:  # SparsePO: the masks are learned, so they need a gradient
        assert np.max(np.abs(r.grad_orig[name])) > 1e-3, name


@pytest.mark.parametrize("case", case_params())
def test_trainer_path_freezes_the_reference(case, fx):
    """Inputs built as the train step builds them (chunked custom-VJP log-probs, KL and log Σπ²;
    reference frozen): the loss and the policy gradient are still the original's, and no
    gradient reaches the reference (or previous-iterate) logits."""
    config = C.load_config(case)
    fn = C.mi_loss_fn(case, config, fx, trainer_path=True)
    value, grads = C.jax_value_and_grads(fn, fx)
    r = _comparison(case.name)
    assert abs(value - r.loss_orig) < LOSS_TOL
    assert np.max(np.abs(grads["Lp"] - r.grad_orig["Lp"])) < GRAD_TOL
    assert not np.any(grads["Lr"]) and not np.any(grads["Lprev"])
    for name in case.extras:
        assert np.max(np.abs(grads[name] - r.grad_orig[name])) < GRAD_TOL, name


@pytest.mark.parametrize("case", case_params())
def test_prior_depends_on_policy_as_the_table_says(case, fx):
    """θ-independent priors carry no policy gradient; θ-dependent ones do (the table's
    "gradient must flow through ζ")."""
    config = C.load_config(case)
    args = [jnp.asarray(fx.arrays()[n]) for n in C.ARRAYS]
    jac = jax.jacobian(C.log_prior_fn(case, config, fx), argnums=0)(*args)
    assert bool(np.any(np.asarray(jac))) == case.theta_prior


# ------------------------------------------------------------------------------------------
# Special cases (mathematics §2.6–2.8, §3.5(vii))
# ------------------------------------------------------------------------------------------


def _mi(name, fx, **replace):
    """MI loss of case ``name`` as a function of the policy logits, with inputs replaced."""
    case = C.BY_NAME[name]
    config = C.load_config(case)
    a = {n: jnp.asarray(v) for n, v in fx.arrays().items()}

    def f(Lp):
        inputs = C.token_inputs(case, fx, Lp, a["Lr"], a["Lprev"], a["mu"], a["md"])
        return mipo_loss(inputs.replace(**replace), config.loss)[0]

    return f, config


def _assert_same_loss_and_grad(f, g, x):
    (vf, gf), (vg, gg) = jax.value_and_grad(f)(x), jax.value_and_grad(g)(x)
    assert abs(float(vf) - float(vg)) < LOSS_TOL
    assert float(jnp.max(jnp.abs(gf - gg))) < GRAD_TOL


@pytest.mark.parametrize("variant, chosen_blocked", [("tdpo2", True), ("tdpo1", False)])
def test_tdpo_stop_gradient_placement(fx, variant, chosen_blocked):
    """TDPO2: ∂L/∂SeqKL(y_w) = 0 (the code's ``.detach()``), ∂L/∂SeqKL(y_l) ≠ 0; TDPO1: both."""
    case = C.BY_NAME[variant]
    config = C.load_config(case)
    a = {n: jnp.asarray(v) for n, v in fx.arrays().items()}
    inputs = C.token_inputs(case, fx, a["Lp"], a["Lr"], a["Lprev"], a["mu"], a["md"])
    g = jax.grad(lambda kl: mipo_loss(inputs.replace(kl=kl), config.loss)[0])(inputs.kl)
    g = np.asarray(g) * fx.m
    assert (not np.any(g[:, 0])) == chosen_blocked
    assert np.all(np.abs(g[:, 1][fx.m[:, 1] > 0]) > 0)
    # The original, differentiated by the complex step w.r.t. the chosen SeqKL.
    rho = O.S(fx.Lp, fx.y, fx.m) - O.S(fx.Lr, fx.y, fx.m)
    seqkl = O.seqsum(O.token_forward_kl(fx.Lr, fx.Lp), fx.m)

    def orig(kl_w):
        return O.tdpo_from_parts(
            rho[:, 0], rho[:, 1], kl_w, seqkl[:, 1], beta=config.loss.alpha,
            alpha=config.loss.prior.kl_coef, tdpo2=chosen_blocked,
        )  # fmt: skip

    d_orig = complex_step.grad(orig, seqkl[:, 0])
    assert (not np.any(d_orig)) == chosen_blocked
    # Per token, the MI gradient w.r.t. KL_t(y_w) is the original's ∂L/∂SeqKL(y_w).
    np.testing.assert_allclose(g[:, 0], d_orig[:, None] * fx.m[:, 0], atol=GRAD_TOL, rtol=0)


def test_tisdpo_with_unit_weights_is_dpo(fx):
    ones = jnp.ones(fx.m.shape)
    f, config = _mi("tisdpo", fx, token_weights=ones)
    g, _ = _mi("dpo", fx)
    _assert_same_loss_and_grad(f, g, jnp.asarray(fx.Lp))
    beta = config.loss.alpha
    orig_tis = O.tisdpo(fx.Lp, fx.Lr, fx.y, fx.m, w=np.ones(fx.m.shape), beta=beta)
    assert abs(orig_tis - O.dpo(fx.Lp, fx.Lr, fx.y, fx.m, beta=beta)) < LOSS_TOL


def test_sparsepo_with_unit_masks_is_tdpo1(fx):
    ones = jnp.ones(fx.m.shape)
    f, config = _mi("sparsepo_common", fx, mask_u=ones)
    g, _ = _mi("tdpo1", fx)
    _assert_same_loss_and_grad(f, g, jnp.asarray(fx.Lp))
    beta = config.loss.alpha
    orig_sparse = O.sparsepo(fx.Lp, fx.Lr, fx.y, fx.m, mu=np.ones(fx.m.shape), beta=beta)
    orig_tdpo1 = O.tdpo(fx.Lp, fx.Lr, fx.y, fx.m, beta=beta, tdpo2=False)
    assert abs(orig_sparse - orig_tdpo1) < LOSS_TOL


def test_tdpo_with_zero_kl_is_dpo(fx):
    zeros = jnp.zeros(fx.m.shape)
    g, config = _mi("dpo", fx)
    for variant in ("tdpo1", "tdpo2"):
        f, _ = _mi(variant, fx, kl=zeros)
        _assert_same_loss_and_grad(f, g, jnp.asarray(fx.Lp))
    rho = O.S(fx.Lp, fx.y, fx.m) - O.S(fx.Lr, fx.y, fx.m)
    kl0 = np.zeros(rho.shape[0])
    for tdpo2 in (False, True):
        orig = O.tdpo_from_parts(
            rho[:, 0], rho[:, 1], kl0, kl0, beta=config.loss.alpha, alpha=0.5, tdpo2=tdpo2
        )
        assert abs(orig - O.dpo(fx.Lp, fx.Lr, fx.y, fx.m, beta=config.loss.alpha)) < LOSS_TOL


def test_token_uniform_prior_is_a_length_term_not_simpo(fx):
    """Spec §3.5(v): ζ = V^{−|y|} gives α(S_w − S_l) + α log V (|y_w| − |y_l|), which is DPO
    against a uniform reference (zero logits), and differs from SimPO."""
    cfg = loss_config("token_uniform", vocab_size=fixture.V)
    y, m = jnp.asarray(fx.y), jnp.asarray(fx.m)

    def f(Lp):
        return mipo_loss(TokenInputs(policy=token_logps(Lp, y), mask=m), cfg)[0]

    beta = cfg.alpha
    n = fx.m.sum(-1)
    sp = O.S(fx.Lp, fx.y, fx.m)
    z = beta * (sp[:, 0] - sp[:, 1]) + beta * np.log(fixture.V) * (n[:, 0] - n[:, 1])
    expected = np.mean(-O.log_sigmoid(z))
    assert abs(float(f(jnp.asarray(fx.Lp))) - expected) < LOSS_TOL
    uniform_ref = np.zeros_like(fx.Lr)
    orig = functools.partial(O.dpo, Lr=uniform_ref, y=fx.y, m=fx.m, beta=beta)
    assert abs(complex_step.value(lambda X: orig(X), fx.Lp) - expected) < LOSS_TOL
    d = complex_step.grad(lambda X: orig(X), fx.Lp) - np.asarray(jax.grad(f)(jnp.asarray(fx.Lp)))
    assert np.max(np.abs(d)) < GRAD_TOL
    simpo = O.simpo(fx.Lp, fx.y, fx.m, beta=beta, gamma=0.0)
    assert abs(simpo - expected) > 1e-3
