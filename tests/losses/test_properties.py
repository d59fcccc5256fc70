"""Property tests (hypothesis) of OUR ``mipo_loss`` on random shapes, masks and lengths.

Spec §3.5 invariances (i)–(vii), §3.3 closed-form gradients, bf16 inputs, empty
completions, and exact metrics/gradients under batch splitting and gradient accumulation.
Float64 checks run under ``jax.enable_x64(True)``; the bf16 checks run in the default
(float32) mode, as in training. Every expected number comes from a formula in the test.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from mipo_jax.losses import loss_config, mipo_loss, validate
from mipo_jax.losses.fdiv import FDIVS
from mipo_jax.losses.links import DIFFERENCE_LINKS, LINKS
from mipo_jax.metrics import merge
from mipo_jax.priors import PRIORS
from mipo_jax.types import TokenInputs
from tests.derivations import util as U

SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
HEAVY = settings(SETTINGS, max_examples=20)  # many distinct configurations per example
FEW = settings(
    max_examples=3,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    phases=[Phase.explicit, Phase.generate],
)
TOL = 1e-10  # float64 value/gradient agreement
FLOAT_FIELDS = (
    "policy",
    "reference",
    "kl",
    "token_weights",
    "mask_u",
    "mask_d",
    "logsumsq",
    "prior",
    "prior_samples",
    "prior_samples_weight",
)
DIFF_FIELDS = ("policy", "reference", "kl", "mask_u", "mask_d", "prior", "prior_samples")
N_SAMPLES = 3

# Links that see a pair only through its logit z (or h = g_w − g_l), and AOT's sorted
# difference of differences: invariant to a per-pair constant in log ζ.
Z_LINKS = ("sigmoid", "cdpo", "robust", "hinge", "ipo", "discopop", "exo_pair", "aot")
SMOOTHING = {"robust": 0.1, "exo_pair": 1e-3, "cdpo": 0.1, "aot": 0.0, "aot_unpaired": 0.0}


# ------------------------------------------------------------------------ random batches


# A small menu of batch shapes (B pairs, T positions), edge cases included: eager JAX compiles
# every operation once per new shape, so a few shapes keep the suite fast; the masks and
# lengths inside them are random.
SHAPES = ((1, 1), (1, 4), (2, 6), (3, 3), (4, 5))


@st.composite
def batches(draw, min_b=1):
    b, t = draw(st.sampled_from([s for s in SHAPES if s[0] >= min_b]))
    return b, t, draw(st.integers(0, 2**31 - 1))


def random_fields(b, t, seed, empty=None):
    """Float64 NumPy fields of a batch [B, 2, T]: a prompt offset, then ≥ 1 completion token
    (or none where ``empty[b, side]``); padding positions hold arbitrary finite values."""
    rng = np.random.default_rng(seed)
    start = rng.integers(0, t, size=(b, 2))
    length = rng.integers(1, t - start + 1)
    pos = np.arange(t)
    mask = ((pos >= start[..., None]) & (pos < (start + length)[..., None])).astype(float)
    if empty is not None:
        mask = mask * (1.0 - np.asarray(empty, float))[..., None]
    s_len = rng.integers(1, t + 1, size=N_SAMPLES)
    return dict(
        policy=-rng.exponential(1.0, (b, 2, t)),
        mask=mask,
        reference=-rng.exponential(1.0, (b, 2, t)),
        kl=rng.exponential(0.3, (b, 2, t)),
        token_weights=rng.uniform(0.7, 1.3, (b, 2, t)),
        mask_u=rng.uniform(0.0, 1.0, (b, 2, t)),
        mask_d=rng.uniform(0.0, 1.0, (b, 2, t)),
        logsumsq=-rng.exponential(0.5, (b, 2, t)),
        prior=-rng.exponential(1.0, (b, 2, t)),
        prior_samples=-rng.exponential(1.0, (N_SAMPLES, t)),
        prior_samples_mask=(pos < s_len[:, None]).astype(float),
        prior_samples_weight=rng.uniform(0.5, 1.5, N_SAMPLES),
    )


def as_inputs(fields, dtype=None):
    """TokenInputs with every array in ``dtype`` (masks included), or as given."""
    conv = lambda k, v: None if v is None else jnp.asarray(v, dtype)
    return TokenInputs(**{k: conv(k, v) for k, v in fields.items()})


def cfg_of(prior="reference", params=None, **overrides):
    cfg = loss_config(prior, **(params or {}))
    for key, value in overrides.items():
        cfg[key] = value
    if cfg.links and cfg.links[0] in SMOOTHING and "label_smoothing" not in overrides:
        cfg.label_smoothing = SMOOTHING[cfg.links[0]]
    validate(cfg)
    return cfg


def value_and_grads(cfg, fields, wrt=("policy",), transform=None, dtype=None, **kw):
    """Loss and its gradient w.r.t. the named fields (a dict), optionally after a transform."""

    def f(diff):
        d = {**fields, **diff}
        if transform is not None:
            d = transform(d)
        return mipo_loss(as_inputs(d, dtype), cfg, **kw)[0]

    diff = {k: jnp.asarray(fields[k], dtype) for k in wrt if fields.get(k) is not None}
    return jax.value_and_grad(f)(diff)


def close(a, b, tol=TOL, rtol=0.0):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=rtol, atol=tol)


def close_tree(a, b, tol=TOL, rtol=0.0):
    jax.tree.map(lambda x, y: close(x, y, tol, rtol), a, b)


def seq(x, mask):
    return np.sum(x * mask, -1)


def swap(fields):
    """Exchange chosen and rejected on every pair-axis field."""
    return {
        k: (
            v[:, ::-1]
            if v is not None
            and np.ndim(v) >= 2
            and k in FLOAT_FIELDS + ("mask",)
            and not k.startswith("prior_samples")
            else v
        )
        for k, v in fields.items()
    }


# ------------------------------------------------------------------------ §3.5 (i)

INV_PRIORS = [
    ("reference", {}),
    ("previous_policy", {}),
    ("tempered_reference", {"temperature": 0.6}),
    ("length_tilted_reference", {"length_coef": 0.2}),
    ("sequential_kl", {}),
    ("sequential_kl", {"kl_coef": 0.5, "stop_grad_chosen": True}),
    ("length_desensitized", {"ld_alpha": 0.4}),
    ("learned", {}),
]
SEQ_LEVEL_OK = {
    "reference",
    "previous_policy",
    "tempered_reference",
    "length_tilted_reference",
    "sequential_kl",
}


@HEAVY
@given(
    batches(),
    st.sampled_from(INV_PRIORS),
    st.sampled_from(Z_LINKS),
    st.floats(0.05, 2.0),
    st.booleans(),
)
def test_per_prompt_prior_constant_changes_nothing(shape, prior, link, alpha, seq_level):
    """(i) log ζ(y) → log ζ(y) + c(x): the same constant on both completions of a pair."""
    with jax.enable_x64(True):
        b, t, seed = shape
        name, params = prior
        f = random_fields(b, t, seed)
        c = np.random.default_rng(seed + 1).normal(0.0, 10.0, b)
        field = "prior" if name == "learned" else "reference"
        if seq_level and name in SEQ_LEVEL_OK:  # a sequence-level reference [B, 2]
            f["reference"] = seq(f["reference"], f["mask"])
            shifted = {**f, "reference": f["reference"] + c[:, None]}
        else:  # the constant at one completion token on each side
            first = np.argmax(f["mask"] > 0, axis=-1)  # [B, 2]
            bump = np.zeros_like(f[field])
            np.put_along_axis(bump, first[..., None], np.repeat(c[:, None, None], 2, 1), -1)
            shifted = {**f, field: f[field] + bump}
        cfg = cfg_of(name, params, alpha=alpha, links=(link,))
        v0, g0 = value_and_grads(cfg, f, ("policy", "kl"))
        v1, g1 = value_and_grads(cfg, shifted, ("policy", "kl"))
        close(v0, v1)
        close_tree(g0, g1)


# ------------------------------------------------------------------------ §3.5 (ii)

SYM_PRIORS = [
    ("reference", {}),
    ("tempered_reference", {"temperature": 1.7}),
    ("length_tilted_reference", {"length_coef": -0.3}),
    ("token_uniform", {"vocab_size": 50}),
    ("uniform", {}),
    ("sequential_kl", {}),
    ("sequential_kl", {"kl_coef": 0.5, "stop_grad_chosen": True}),
    ("token_weighted", {}),
    ("sparse_masks", {}),
    ("length_normalized", {}),
    ("length_desensitized", {"ld_alpha": 0.3}),
    ("odds", {}),
    ("learned", {}),
]


@SETTINGS
@given(
    batches(), st.sampled_from(SYM_PRIORS), st.sampled_from(["sum", "mean"]), st.floats(0.05, 2.0)
)
def test_swap_antisymmetry(shape, prior, normalize, alpha):
    """(ii) L(y_w, y_l) − L(y_l, y_w) = −z, for every label-symmetric prior."""
    with jax.enable_x64(True):
        b, t, seed = shape
        f = random_fields(b, t, seed)
        cfg = cfg_of(*prior, alpha=alpha, normalize=normalize)
        loss, metrics = mipo_loss(as_inputs(f), cfg)
        loss_swapped = mipo_loss(as_inputs(swap(f)), cfg)[0]
        margins = metrics.get("scores/margins", metrics["rewards/margins"])  # α(s_w − s_l)
        close(loss - loss_swapped, -margins.value)
        if prior[0] == "reference":  # z from its formula
            n = np.sum(f["mask"], -1) if normalize == "mean" else 1.0
            rho = (seq(f["policy"], f["mask"]) - seq(f["reference"], f["mask"])) / n
            close(loss - loss_swapped, -np.mean(alpha * (rho[:, 0] - rho[:, 1])))


# ------------------------------------------------------------------------ §3.5 (iii)


@SETTINGS
@given(
    batches(),
    st.sampled_from(["reference", "learned"]),
    st.sampled_from(["sum", "mean"]),
    st.floats(0.05, 2.0),
)
def test_stop_gradient_policy_prior_gives_log2(shape, prior, normalize, alpha):
    """(iii) ζ = sg(π): L = log 2 and ∂L/∂ℓ^π_t = ∓α m_t / (2 B n(y))."""
    with jax.enable_x64(True):
        b, t, seed = shape
        f = random_fields(b, t, seed)
        field = "prior" if prior == "learned" else "reference"
        tie = lambda d: {**d, field: jax.lax.stop_gradient(d["policy"])}
        value, grads = value_and_grads(
            cfg_of(prior, alpha=alpha, normalize=normalize), f, transform=tie
        )
        close(value, np.log(2.0), 1e-14)
        n = np.sum(f["mask"], -1, keepdims=True) if normalize == "mean" else 1.0
        sign = np.array([-1.0, 1.0])[None, :, None]
        close(grads["policy"], sign * alpha * f["mask"] / (2 * b * n), 1e-14)


# ------------------------------------------------------------------------ §3.5 (iv)

SHIFT_PRIORS = [
    ("reference", {}, 1.0),
    ("previous_policy", {}, 1.0),
    ("tempered_reference", {"temperature": 0.6}, 0.6),
    ("length_tilted_reference", {"length_coef": 0.2}, 1.0),
    ("learned", {}, 1.0),
]
SHIFT_LINKS = tuple(n for n in LINKS.names() if n != "aot")  # AOT sorts S^π and log ζ apart


@SETTINGS
@given(
    batches(),
    st.sampled_from(SHIFT_PRIORS),
    st.sampled_from(SHIFT_LINKS),
    st.sampled_from(FDIVS.names()),
    st.sampled_from(["sum", "mean"]),
    st.floats(0.05, 2.0),
    st.booleans(),
)
def test_joint_shift_of_policy_and_prior(shape, prior, link, fdiv, normalize, alpha, trl_order):
    """(iv) (log π, log ζ) → (+g(y), +g(y)) leaves loss and ∇_policy unchanged (in either
    order of score and length normalisation; scores only on the links that take them)."""
    with jax.enable_x64(True):
        b, t, seed = shape
        name, params, scale = prior  # the field shift that moves log ζ by g
        f = random_fields(b, t, seed)
        g = np.random.default_rng(seed + 2).normal(0.0, 3.0, (b, 2, t))
        field = "prior" if name == "learned" else "reference"
        shifted = {**f, "policy": f["policy"] + g, field: f[field] + scale * g}
        fdiv = fdiv if link in DIFFERENCE_LINKS else "reverse_kl"
        cfg = cfg_of(
            name,
            params,
            alpha=alpha,
            links=(link,),
            f_divergence=fdiv,
            normalize=normalize,
            trl_order=trl_order,
        )
        v0, g0 = value_and_grads(cfg, f)
        v1, g1 = value_and_grads(cfg, shifted)
        # f-divergence scores such as −e^{−ρ} reach ~1e6, so the tolerance is also relative.
        close(v0, v1, rtol=1e-9)
        close_tree(g0, g1, rtol=1e-9)


# ------------------------------------------------------------------------ §3.5 (v)


def _simpo_reference(f, beta, gamma):
    """SimPO (Meng et al. 2024, Eq. 6): −log σ(β A_w − β A_l − γ), per-token gradient
    ∓(β/|y|) σ(−z) m_t / B."""
    n = np.sum(f["mask"], -1)
    avg = seq(f["policy"], f["mask"]) / n
    z = beta * (avg[:, 0] - avg[:, 1]) - gamma
    sign = np.array([-1.0, 1.0])[None, :, None]
    grad = sign * (beta / n)[..., None] * U.sigmoid(-z)[:, None, None] * f["mask"] / len(z)
    return np.mean(-U.log_sigmoid(z)), grad


@SETTINGS
@given(batches(), st.floats(0.5, 10.0), st.floats(0.0, 2.0))
def test_simpo_is_midpo_on_length_normalised_policy(shape, beta, gamma):
    """(v) SimPO mapping (i): MI-DPO on π^{1/|y|} with uniform ζ and margin γ."""
    with jax.enable_x64(True):
        f = random_fields(*shape)
        value, grad = _simpo_reference(f, beta, gamma)
        v, g = value_and_grads(cfg_of("uniform", alpha=beta, normalize="mean", margin=gamma), f)
        close(v, value)
        close(g["policy"], grad)


@SETTINGS
@given(batches(), st.floats(0.5, 10.0), st.floats(0.0, 2.0))
def test_simpo_prior_mapping_ii(shape, beta, gamma):
    """(v) SimPO mapping (ii): plain MI-DPO with the θ-dependent prior (1 − 1/|y|) S^π ± γ/2β."""
    with jax.enable_x64(True):
        f = random_fields(*shape)
        value, grad = _simpo_reference(f, beta, gamma)
        v, g = value_and_grads(cfg_of("simpo", {"gamma": gamma}, alpha=beta), f)
        close(v, value)
        close(g["policy"], grad)


@SETTINGS
@given(batches(), st.floats(0.05, 2.0), st.integers(2, 100_000))
def test_token_uniform_prior_is_an_rdpo_length_term(shape, alpha, vocab):
    """(v) ζ = V^{−|y|}: z = α(S_w − S_l) + α log V (|y_w| − |y_l|), i.e. R-DPO with
    α_R = α log V and a zero reference; it is not SimPO."""
    with jax.enable_x64(True):
        b, t, seed = shape
        f = random_fields(b, t, seed)
        n, s = np.sum(f["mask"], -1), seq(f["policy"], f["mask"])
        z = alpha * (s[:, 0] - s[:, 1]) + alpha * np.log(vocab) * (n[:, 0] - n[:, 1])
        sign = np.array([-1.0, 1.0])[None, :, None]
        grad = sign * alpha * U.sigmoid(-z)[:, None, None] * f["mask"] / b
        rdpo = {**f, "reference": np.zeros_like(f["reference"])}
        for cfg, fields in (
            (cfg_of("token_uniform", {"vocab_size": vocab}, alpha=alpha), f),
            (
                cfg_of(
                    "length_tilted_reference", {"length_coef": alpha * np.log(vocab)}, alpha=alpha
                ),
                rdpo,
            ),
        ):
            value, grads = value_and_grads(cfg, fields)
            close(value, np.mean(-U.log_sigmoid(z)))
            close(grads["policy"], grad)


# ------------------------------------------------------------------------ §3.5 (vi)


@SETTINGS
@given(batches(), st.floats(0.0, 0.45), st.floats(0.05, 2.0))
def test_robust_dpo_is_unbiased(shape, eps, alpha):
    """(vi) (1−ε) L_rob(h) + ε L_rob(−h) = L_DPO(h), values and gradients."""
    with jax.enable_x64(True):
        b, t, seed = shape
        f = random_fields(b, t, seed)
        rob = cfg_of(alpha=alpha, links=("robust",), label_smoothing=eps)
        v_h, g_h = value_and_grads(rob, f)
        v_m, g_m = value_and_grads(rob, f, transform=swap)
        v_dpo, g_dpo = value_and_grads(cfg_of(alpha=alpha), f)
        close((1 - eps) * v_h + eps * v_m, v_dpo)
        close((1 - eps) * g_h["policy"] + eps * g_m["policy"], g_dpo["policy"])


# ------------------------------------------------------------------------ §3.5 (vii)


@SETTINGS
@given(batches(), st.floats(0.05, 2.0), st.floats(0.0, 1.0), st.booleans())
def test_reductions_to_dpo_and_tdpo1(shape, alpha, alpha_t, common):
    """(vii) TDPO1/TDPO2 with SeqKL ≡ 0 are DPO; TIS-DPO with w ≡ 1 is DPO; SparsePO with
    m^u = m^d ≡ 1 is TDPO1 (gradients w.r.t. the policy and the per-token KL included)."""
    with jax.enable_x64(True):
        b, t, seed = shape
        f = random_fields(b, t, seed)
        wrt = ("policy", "kl")
        v_dpo, g_dpo = value_and_grads(cfg_of(alpha=alpha), f, wrt)
        zero_kl = {**f, "kl": np.zeros_like(f["kl"])}
        for params in ({}, {"kl_coef": alpha_t, "stop_grad_chosen": True}):
            v, g = value_and_grads(cfg_of("sequential_kl", params, alpha=alpha), zero_kl, wrt)
            close(v, v_dpo)
            close(g["policy"], g_dpo["policy"])
        ones = np.ones_like(f["policy"])
        v, g = value_and_grads(
            cfg_of("token_weighted", alpha=alpha), {**f, "token_weights": ones}, wrt
        )
        close(v, v_dpo)
        close(g["policy"], g_dpo["policy"])
        v_t1, g_t1 = value_and_grads(cfg_of("sequential_kl", alpha=alpha), f, wrt)
        sparse = {**f, "mask_u": ones, "mask_d": None if common else ones}
        v, g = value_and_grads(cfg_of("sparse_masks", alpha=alpha), sparse, wrt)
        close(v, v_t1)
        close_tree(g, g_t1)


# ------------------------------------------------------------------------ §3.3


@SETTINGS
@given(batches(), st.floats(0.05, 2.0), st.floats(0.0, 0.45))
def test_closed_form_gradients(shape, alpha, eps):
    """§3.3: DPO ∂L/∂S_w = −ασ(−z); cDPO (σ(z) − (1−ε))α; IPO 2(h − 1/(2τ))."""
    with jax.enable_x64(True):
        b, t, seed = shape
        f = random_fields(b, t, seed)
        rho = seq(f["policy"], f["mask"]) - seq(f["reference"], f["mask"])
        h = rho[:, 0] - rho[:, 1]
        z = alpha * h
        per_token = lambda dz: (
            np.array([1.0, -1.0])[None, :, None] * dz[:, None, None] * (f["mask"] / b)
        )
        _, g = value_and_grads(cfg_of(alpha=alpha), f)
        close(g["policy"], per_token(-alpha * U.sigmoid(-z)))
        _, g = value_and_grads(cfg_of(alpha=alpha, links=("cdpo",), label_smoothing=eps), f)
        close(g["policy"], per_token(alpha * (U.sigmoid(z) - (1 - eps))))
        _, g = value_and_grads(cfg_of(alpha=alpha, links=("ipo",)), f)
        close(g["policy"], per_token(2.0 * (h - 1.0 / (2.0 * alpha))), 1e-9)


# ------------------------------------------------------------------------ bf16

PRIOR_CFGS = {
    "dpop": {},
    "learned": dict(mi_weight=0.5),
    "length_desensitized": {},
    "length_normalized": {},
    "length_tilted_reference": {},
    "odds": dict(normalize="mean", alpha=1.0, sft_weight=1.0),
    "previous_policy": {},
    "reference": {},
    "sequential_kl": {},
    "simpo": dict(alpha=2.0),
    "sparse_masks": dict(l1_mask_u=1e-3, l1_mask_d=1e-3),
    "tempered_reference": {},
    "token_uniform": {},
    "token_weighted": {},
    "uniform": dict(normalize="mean", margin=0.5),
}
PRIOR_PARAMS = {
    "token_uniform": {"vocab_size": 32000},
    "tempered_reference": {"temperature": 0.8},
    "length_tilted_reference": {"length_coef": 0.2},
    "simpo": {"gamma": 0.5},
    "sequential_kl": {"kl_coef": 0.5, "stop_grad_chosen": True},
    "length_desensitized": {"ld_alpha": 0.5},
}
CONFIGS = (
    [(p, PRIOR_PARAMS.get(p, {}), PRIOR_CFGS.get(p, {})) for p in PRIORS.names()]
    + [
        ("reference", {}, dict(links=(k,), normalize="mean" if k == "ipo" else "sum"))
        for k in LINKS.names()
    ]
    + [("reference", {}, dict(f_divergence=d)) for d in FDIVS.names()]
    + [
        (
            "reference",
            {},
            dict(weighting="wpo", links=("sigmoid", "bco_pair"), link_weights=(0.8, 0.2)),
        )
    ]
)
CONFIG_PARAMS = [
    pytest.param(
        p,
        q,
        o,
        id=f"{p}-{'-'.join(f'{k}={v}' for k, v in o.items())}",
    )
    for p, q, o in CONFIGS
]


def test_every_prior_and_link_is_covered():
    assert {c[0] for c in CONFIGS} == set(PRIORS.names())
    assert {k for c in CONFIGS for k in c[2].get("links", ())} >= set(LINKS.names())
    for prior, params, overrides in CONFIGS:  # every configuration validates
        cfg_of(prior, params, **overrides)


@pytest.mark.parametrize("prior,params,overrides", CONFIG_PARAMS)
@FEW
@given(batches(min_b=2))
def test_bf16_inputs_give_float32_results(prior, params, overrides, shape):
    """bf16 inputs: a finite float32 loss equal to the float32 computation on the same
    values, finite gradients equal to the float32 gradients rounded to bf16."""
    b, t, seed = shape
    f = random_fields(b, t, seed)
    f = {
        k: (
            np.asarray(jnp.asarray(v, jnp.bfloat16).astype(jnp.float32)) if k in FLOAT_FIELDS else v
        )
        for k, v in f.items()
    }  # bf16-representable values
    cfg = cfg_of(prior, params, **overrides)
    v16, g16 = value_and_grads(cfg, f, DIFF_FIELDS, dtype=jnp.bfloat16)
    v32, g32 = value_and_grads(cfg, f, DIFF_FIELDS, dtype=jnp.float32)
    assert v16.dtype == jnp.float32 and np.isfinite(float(v16))
    np.testing.assert_allclose(float(v16), float(v32), rtol=1e-6)  # f32 compute, not bf16
    bf16_ulp = 2.0**-7
    for k in g16:
        g = np.asarray(g16[k], float)
        assert g16[k].dtype == jnp.bfloat16 and np.all(np.isfinite(g)), k
        np.testing.assert_allclose(g, np.asarray(g32[k], float), rtol=bf16_ulp, atol=1e-30)


# ------------------------------------------------------------------------ empty completions


@pytest.mark.parametrize("prior,params,overrides", CONFIG_PARAMS)
@FEW
@given(batches(min_b=2), st.integers(0, 2**31 - 1))
def test_empty_completions_are_excluded_without_nan(prior, params, overrides, shape, seed2):
    with jax.enable_x64(True):
        b, t, seed = shape
        rng = np.random.default_rng(seed2)
        empty = rng.random((b, 2)) < 0.35
        f = random_fields(b, t, seed, empty=empty)
        cfg = cfg_of(prior, params, **overrides)
        loss, metrics = mipo_loss(as_inputs(f), cfg)
        value, grads = value_and_grads(cfg, f, DIFF_FIELDS)
        assert np.isfinite(float(loss))
        close(loss, value, 1e-14)
        for k, g in grads.items():
            assert np.all(np.isfinite(np.asarray(g))), k
        for k, m in metrics.items():
            assert np.isfinite(float(m.value)), k
        bad = np.any(empty, axis=-1)
        assert float(metrics["pairs/empty"].total) == np.sum(bad)
        assert float(metrics["pairs/empty"].count) == b
        keep = ~bad
        if not np.any(keep):  # only the MI term (prior samples, not pairs) is left
            mi = cfg.mi_weight * float(metrics["loss/mi"].value) if cfg.mi_weight else 0.0
            close(loss, mi)
            return
        sub = {k: (v[keep] if np.ndim(v) == 3 else v) for k, v in f.items()}
        close(loss, mipo_loss(as_inputs(sub), cfg)[0])
        zero = ~keep[:, None, None] | np.zeros((1, 2, 1), bool)
        for k in ("policy", "reference", "kl", "mask_u", "mask_d", "prior"):
            if k in grads:
                assert np.all(np.asarray(grads[k])[np.broadcast_to(zero, f[k].shape)] == 0), k


# ------------------------------------------------------------------------ split / accumulate

SPLIT_CFGS = [
    (
        "reference",
        {},
        dict(links=("sigmoid", "hinge", "ipo"), link_weights=(0.5, 0.3, 0.2), sft_weight=0.7),
    ),
    ("learned", {}, dict(mi_weight=0.4, alpha=0.3)),
    (
        "sparse_masks",
        {},
        dict(
            l1_mask_u=0.01,
            l1_mask_d=0.02,
            weighting="wpo",
            links=("sigmoid", "nca_pair"),
            link_weights=(1.0, 0.5),
        ),
    ),
    (
        "sequential_kl",
        {"kl_coef": 0.5, "stop_grad_chosen": True},
        dict(f_divergence="js_divergence", links=("robust",), label_smoothing=0.1),
    ),
    (
        "uniform",
        {},
        dict(
            alpha=2.0,
            normalize="mean",
            margin=0.3,
            links=("sigmoid", "apo_zero", "sppo_hard"),
            link_weights=(1.0, 0.1, 0.1),
        ),
    ),
]


def _normalizers(f, cfg):
    valid = np.all(np.sum(f["mask"], -1) > 0, -1)
    return dict(
        pairs=jnp.asarray(float(np.sum(valid))),
        sft_tokens=jnp.asarray(float(np.sum(f["mask"][valid, 0]))),
        samples=jnp.asarray(float(np.sum(f["prior_samples_weight"]))),
    )


def _split(f, k, j):
    a, b = {}, {}
    for key, v in f.items():
        if key.startswith("prior_samples"):
            a[key], b[key] = v[:j], v[j:]
        else:
            a[key], b[key] = v[:k], v[k:]
    return a, b


@HEAVY
@given(batches(min_b=2), st.sampled_from(SPLIT_CFGS), st.data())
def test_split_batches_and_gradient_accumulation_are_exact(shape, config, data):
    """Micro-batches with global ``normalizers``: losses and gradients add up to the full
    batch's; merged Metric sums equal the full batch's metrics (all of them with
    normalizers, all but the scalar 'loss' without)."""
    with jax.enable_x64(True):
        b, t, seed = shape
        k = data.draw(st.integers(1, b - 1))
        j = data.draw(st.integers(0, N_SAMPLES))
        empty = np.random.default_rng(seed + 3).random((b, 2)) < 0.2
        empty[0] = False  # at least one valid pair in the whole batch
        f = random_fields(b, t, seed, empty=empty)
        cfg = cfg_of(*config[:2], **config[2])
        norm = _normalizers(f, cfg)
        full_loss, full_metrics = mipo_loss(as_inputs(f), cfg)
        _, full_grads = value_and_grads(cfg, f, DIFF_FIELDS)
        parts = _split(f, k, j)
        outs = [mipo_loss(as_inputs(p), cfg, normalizers=norm) for p in parts]
        grads = [value_and_grads(cfg, p, DIFF_FIELDS, normalizers=norm)[1] for p in parts]
        close(outs[0][0] + outs[1][0], full_loss, 1e-12)
        for key in full_grads:
            joined = np.concatenate([grads[0][key], grads[1][key]], axis=0)
            close(joined, full_grads[key], 1e-12)
        merged = merge(outs[0][1], outs[1][1])
        assert set(merged) == set(full_metrics)
        for key, metric in merged.items():
            close(metric.value, full_metrics[key].value, 1e-12)
        plain = merge(*(mipo_loss(as_inputs(p), cfg)[1] for p in parts))
        for key, metric in plain.items():
            if key != "loss":
                close(metric.value, full_metrics[key].value, 1e-12)
