"""The gated MLP's custom VJP (`layers.gated_mlp`, ``mlp_impl='custom_vjp'``).

Reference: the closed-form gradient of y = (act(x·Wg) ∘ x·Wu)·Wd in float64 NumPy:
dh = dy·Wdᵀ, dWd = hᵀ·dy, du = dh ∘ act(g), dg = dh ∘ u ∘ act'(g), dWg = xᵀ·dg, dWu = xᵀ·du,
dx = dg·Wgᵀ + du·Wuᵀ, with silu'(g) = σ(g)(1 + g(1 − σ(g))) and tanh-GELU's derivative.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mipo_jax.models import CausalLM, ModelConfig
from mipo_jax.models.layers import activation, gated_mlp, load, store


def _sigmoid(x):
    return 1 / (1 + np.exp(-x))


def _silu_prime(g):
    s = _sigmoid(g)
    return s * (1 + g * (1 - s))


def _gelu_tanh(g):
    c = np.sqrt(2 / np.pi)
    return 0.5 * g * (1 + np.tanh(c * (g + 0.044715 * g**3)))


def _gelu_tanh_prime(g):
    c = np.sqrt(2 / np.pi)
    t = np.tanh(c * (g + 0.044715 * g**3))
    return 0.5 * (1 + t) + 0.5 * g * (1 - t**2) * c * (1 + 3 * 0.044715 * g**2)


ACTS = {
    "silu": (lambda g: g * _sigmoid(g), _silu_prime),
    "gelu_new": (_gelu_tanh, _gelu_tanh_prime),
}


@pytest.mark.parametrize("name", ["silu", "gelu_new"])
def test_gated_mlp_equals_float64_reference(name):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 5, 6))
    wg, wu = rng.standard_normal((6, 7)) / 2, rng.standard_normal((6, 7)) / 2
    wd = rng.standard_normal((7, 6)) / 3
    dy = rng.standard_normal((2, 5, 6))
    act, act_prime = ACTS[name]
    g, u = x @ wg, x @ wu
    h = act(g) * u
    want_y = h @ wd
    dh = dy @ wd.T
    du, dg = dh * act(g), dh * u * act_prime(g)
    flat = lambda a: a.reshape(-1, a.shape[-1])
    want = (dg @ wg.T + du @ wu.T, flat(x).T @ flat(dg), flat(x).T @ flat(du), flat(h).T @ flat(dy))
    with jax.enable_x64(True):
        f = lambda *a: gated_mlp(*a, activation(name))
        y, vjp = jax.vjp(f, *(jnp.asarray(a) for a in (x, wg, wu, wd)))
        got = vjp(jnp.asarray(dy))
    np.testing.assert_allclose(np.asarray(y), want_y, atol=1e-12)
    for a, b, n in zip(got, want, ("dx", "dWg", "dWu", "dWd")):
        np.testing.assert_allclose(np.asarray(a), b, atol=1e-12, err_msg=n)


def test_store_and_load_keep_bits():
    x = jnp.asarray(np.random.default_rng(1).standard_normal((3, 4)), jnp.bfloat16)
    y = jnp.arange(3.0)
    words = store(x, y)
    assert words[0].dtype == jnp.uint16 and words[1].dtype == y.dtype
    back = load(jnp.bfloat16, *words)
    assert back[0].dtype == jnp.bfloat16 and np.array_equal(back[0], x)
    assert back[1] is words[1]


CFG = ModelConfig(
    family="llama", vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2,
    num_heads=2, num_kv_heads=1, head_dim=16,
)  # fmt: skip


@pytest.mark.parametrize("scan", [True, False])
def test_model_custom_vjp_equals_autodiff(scan):
    """Hidden states and parameter gradients (float32) of the two MLP implementations."""
    rng = np.random.default_rng(2)
    tokens = jnp.asarray(rng.integers(0, 64, (2, 24)))
    r = jnp.asarray(rng.standard_normal((2, 24, 32)), jnp.float32)
    outs = {}
    for impl in ("autodiff", "custom_vjp"):
        cfg = dataclasses.replace(CFG, mlp_impl=impl, scan_layers=scan)
        graph, params = nnx.split(CausalLM(cfg, rngs=nnx.Rngs(0)))
        loss = lambda p, graph=graph: jnp.sum(nnx.merge(graph, p).hidden(tokens) * r)
        outs[impl] = jax.jit(jax.value_and_grad(loss))(params)
    (la, ga), (lc, gc) = outs["autodiff"], outs["custom_vjp"]
    np.testing.assert_allclose(lc, la, rtol=1e-6)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(gc), jax.tree.leaves(ga)):
        scale = float(jnp.max(jnp.abs(b)))
        np.testing.assert_allclose(a, b, atol=1e-5 * scale, err_msg=jax.tree_util.keystr(path))


@pytest.mark.slow
def test_custom_vjp_saves_less_under_a_bfloat16_scan():
    """bfloat16 compute, layers scanned: the custom VJP keeps fewer, 16-bit residuals than
    autodiff (whose stacked residuals XLA:CPU also copies to float32)."""
    tokens = jax.ShapeDtypeStruct((4, 512), jnp.int32)
    temp = {}
    for impl in ("autodiff", "custom_vjp"):
        cfg = dataclasses.replace(
            CFG, mlp_impl=impl, compute_dtype="bfloat16", intermediate_size=256, num_layers=4
        )
        graph, params = nnx.split(CausalLM(cfg, rngs=nnx.Rngs(0)))
        loss = lambda p, t, graph=graph: jnp.sum(nnx.merge(graph, p).hidden(t).astype(jnp.float32))
        compiled = jax.jit(jax.grad(loss)).lower(params, tokens).compile()
        temp[impl] = compiled.memory_analysis().temp_size_in_bytes
    assert temp["custom_vjp"] < 0.8 * temp["autodiff"], temp


def test_custom_vjp_refuses_biases():
    cfg = dataclasses.replace(CFG, mlp_bias=True, mlp_impl="custom_vjp")
    with pytest.raises(ValueError, match="mlp_impl='custom_vjp' has no biases"):
        CausalLM(cfg, rngs=nnx.Rngs(0))
