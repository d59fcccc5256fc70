"""Chunked log-probs, entropy, KL and log Σπ² from hidden states equal the naive forms.

The naive reference is ``logits = h @ w`` followed by the existing full-logit functions in
``mipo_jax.losses.logps``; values and gradients (w.r.t. ``h`` and ``w``) must agree.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from mipo_jax.losses import logps as L

NAMES = ("logps", "entropy", "kl", "logsumsq")


def _problem(lead=(2,), t=37, d=16, v=50, dtype=jnp.float32, seed=0):
    k = jax.random.split(jax.random.key(seed), 6)
    h = jax.random.normal(k[0], (*lead, t, d), dtype)
    w = (jax.random.normal(k[1], (d, v), dtype) / 2).astype(dtype)
    ref_h = jax.random.normal(k[2], (*lead, t, d), dtype)
    ref_w = (jax.random.normal(k[3], (d, v), dtype) / 2).astype(dtype)
    y = jax.random.randint(k[4], (*lead, t), 0, v)
    cts = jax.random.normal(k[5], (4, *lead, t), jnp.float32)
    return h, w, ref_h, ref_w, y, cts


def _naive(h, w, ref_h, ref_w, y):
    z, zr = h @ w, jax.lax.stop_gradient(ref_h @ ref_w)
    return (L.token_logps(z, y), L.token_entropy(z), L.token_kl(zr, z), L.token_logsumsq(z))


def _chunked(h, w, ref_h, ref_w, y, chunk):
    s = L.chunked_token_stats(
        h, w, y, entropy=True, logsumsq=True, ref_h=ref_h, ref_w=ref_w, chunk_size=chunk
    )
    return tuple(getattr(s, n) for n in NAMES)


def _single(h, w, ref_h, ref_w, y, chunk):
    """The one-quantity wrappers, each on its own."""
    return (
        L.chunked_token_logps(h, w, y, chunk_size=chunk),
        L.chunked_token_entropy(h, w, chunk_size=chunk),
        L.chunked_token_kl(ref_h, ref_w, h, w, chunk_size=chunk),
        L.chunked_token_logsumsq(h, w, chunk_size=chunk),
    )


def _scalar(f, cts):
    """A random linear functional of all outputs, so one grad checks every output's VJP."""
    return lambda *a: sum(jnp.sum(c.astype(o.dtype) * o) for c, o in zip(cts, f(*a)))


def _close(actual, desired, rtol, atol):
    for a, d in zip(actual, desired):
        np.testing.assert_allclose(np.asarray(a), np.asarray(d), rtol=rtol, atol=atol)


@pytest.mark.parametrize(
    "fn,lead,t,chunk",
    [
        (_chunked, (2,), 37, 8),  # T not a multiple of the chunk
        (_chunked, (2,), 32, 8),
        (_chunked, (), 37, 5),  # no batch axis: h is [N, D]
        (_chunked, (2, 2), 11, 4),  # [B, 2, T, D], the pair axis
        (_chunked, (3,), 7, 64),  # chunk longer than T
        (_chunked, (1,), 5, 1),
        (_single, (2,), 37, 8),
    ],
    ids=["uneven", "even", "flat", "pairs", "chunk>T", "chunk=1", "wrappers"],
)
def test_values_and_grads_f32(fn, lead, t, chunk):
    h, w, ref_h, ref_w, y, cts = _problem(lead, t)
    run = jax.jit(lambda *a: fn(*a, chunk))
    _close(run(h, w, ref_h, ref_w, y), _naive(h, w, ref_h, ref_w, y), 1e-5, 1e-5)
    grad = lambda f: jax.grad(_scalar(f, cts), argnums=(0, 1))(h, w, ref_h, ref_w, y)
    _close(jax.jit(lambda: grad(lambda *a: fn(*a, chunk)))(), grad(_naive), 1e-5, 1e-5)


def test_values_and_grads_f64():
    with jax.enable_x64(True):
        h, w, ref_h, ref_w, y, cts = _problem((2,), 29, dtype=jnp.float64)
        cts = cts.astype(jnp.float64)
        out = _chunked(h, w, ref_h, ref_w, y, 8)
        assert all(o.dtype == jnp.float64 for o in out)
        _close(out, _naive(h, w, ref_h, ref_w, y), 1e-12, 1e-12)
        grad = lambda f: jax.grad(_scalar(f, cts), argnums=(0, 1))(h, w, ref_h, ref_w, y)
        _close(grad(lambda *a: _chunked(*a, 8)), grad(_naive), 1e-12, 1e-12)


def test_each_output_alone_has_its_own_gradient():
    """Cotangent on one output at a time (the others unused) matches naive."""
    h, w, ref_h, ref_w, y, cts = _problem((2,), 13)
    for i in range(4):
        pick = lambda f, i=i: lambda *a: jnp.sum(cts[i] * f(*a)[i])
        want = jax.grad(pick(_naive), argnums=(0, 1))(h, w, ref_h, ref_w, y)
        got = jax.grad(pick(lambda *a: _single(*a, 4)), argnums=(0, 1))(h, w, ref_h, ref_w, y)
        _close(got, want, 1e-5, 1e-5)


def test_reference_side_gets_no_gradient():
    h, w, ref_h, ref_w, y, cts = _problem((2,), 9)
    f = lambda rh, rw: jnp.sum(L.chunked_token_kl(rh, rw, h, w, chunk_size=4))
    g_rh, g_rw = jax.grad(f, argnums=(0, 1))(ref_h, ref_w)
    assert not np.any(np.asarray(g_rh)) and not np.any(np.asarray(g_rw))


def test_bf16_inputs_give_f32_outputs_close_to_f32_math():
    h, w, ref_h, ref_w, y, cts = _problem((2,), 37, d=32, v=300)
    bf = [x.astype(jnp.bfloat16) for x in (h, w, ref_h, ref_w)]
    up = [x.astype(jnp.float32) for x in bf]  # the same numbers, in float32
    out = jax.jit(lambda *a: _chunked(*a, 8))(*bf, y)
    assert all(o.dtype == jnp.float32 and np.all(np.isfinite(o)) for o in out)
    # Logits accumulate in float32, so this equals float32 math on the rounded inputs...
    _close(out, _naive(*up, y), 1e-5, 1e-4)
    # ...and is closer to it than the naive bf16 path (logits rounded to bf16) is.
    for c, n, r in zip(out, _naive(*bf, y), _naive(*up, y)):
        assert np.max(np.abs(c - r)) < np.max(np.abs(n - r))
    grads = jax.grad(_scalar(lambda *a: _chunked(*a, 8), cts), argnums=(0, 1))(*bf, y)
    want = jax.grad(_scalar(_naive, cts), argnums=(0, 1))(*up, y)
    for g, gw in zip(grads, want):
        assert g.dtype == jnp.bfloat16 and np.all(np.isfinite(np.asarray(g, np.float32)))
        np.testing.assert_allclose(np.asarray(g, np.float32), gw, rtol=2e-2, atol=2e-2)


def test_batch_sharded_on_eight_devices_equals_single_device():
    assert jax.device_count() == 8
    mesh = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Auto,))
    h, w, ref_h, ref_w, y, cts = _problem((8,), 37)
    args = (h, w, ref_h, ref_w, y)
    spec = (P("data"), P(), P("data"), P(), P("data"))
    sharded = [jax.device_put(a, NamedSharding(mesh, s)) for a, s in zip(args, spec)]
    f = lambda *a: _chunked(*a, 8)
    vg = jax.jit(lambda *a: jax.value_and_grad(_scalar(f, cts), argnums=(0, 1))(*a))
    (val_s, grads_s), (val_1, grads_1) = vg(*sharded), vg(*args)
    # 1e-5: the scalar sums 4·8·37 terms in a different order per device (measured 2.7e-6).
    assert grads_s[0].sharding.spec[0] == "data"  # dh keeps the batch sharding
    _close([val_s, *grads_s], [val_1, *grads_1], 1e-5, 1e-5)
    _close(jax.jit(f)(*sharded), f(*args), 1e-5, 1e-5)


def test_peak_memory_is_per_chunk_not_per_sequence():
    """Compiled temp memory of forward+backward stays far below one [T, V] float32 array."""
    t, d, v, chunk = 2048, 32, 4096, 64
    h = jax.ShapeDtypeStruct((1, t, d), jnp.float32)
    w = jax.ShapeDtypeStruct((d, v), jnp.float32)
    y = jax.ShapeDtypeStruct((1, t), jnp.int32)

    def temp(f):
        g = jax.grad(lambda h, w, y: jnp.sum(f(h, w, y)), argnums=(0, 1))
        return jax.jit(g).lower(h, w, y).compile().memory_analysis().temp_size_in_bytes

    logits_bytes = t * v * 4
    naive = temp(lambda h, w, y: L.token_logps(h @ w, y))
    lean = temp(lambda h, w, y: L.chunked_token_logps(h, w, y, chunk_size=chunk))
    assert naive >= logits_bytes
    assert lean < logits_bytes / 8


def test_bad_arguments_are_rejected():
    h, w, ref_h, ref_w, y, _ = _problem((2,), 5)
    with pytest.raises(ValueError, match="ref_h and ref_w"):
        L.chunked_token_stats(h, w, y, ref_h=ref_h)
    with pytest.raises(ValueError, match="width"):
        L.chunked_token_stats(h, w.T, y)
    with pytest.raises(ValueError, match="nothing"):
        L.chunked_token_stats(h, w)
    with pytest.raises(ValueError, match="chunk_size"):
        L.chunked_token_stats(h, w, y, chunk_size=0)
    with pytest.raises(ValueError, match="reference shapes"):
        L.chunked_token_stats(h, w, y, ref_h=ref_h[:1], ref_w=ref_w)
    with pytest.raises(ValueError, match="reference shapes"):
        L.chunked_token_stats(h, w, y, ref_h=ref_h[..., :3], ref_w=ref_w)
    with pytest.raises(ValueError, match="targets"):
        L.chunked_token_stats(h, w, y[:, :2])


def test_reference_may_have_another_width():
    """KL needs only the same vocabulary: the reference's D may differ from the policy's."""
    h, w, _, _, y, cts = _problem((2,), 13, d=16)
    _, _, ref_h, ref_w, _, _ = _problem((2,), 13, d=8, seed=1)
    want = L.token_kl(ref_h @ ref_w, h @ w)
    got = L.chunked_token_kl(ref_h, ref_w, h, w, chunk_size=4)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    f = lambda kl: lambda h, w: jnp.sum(cts[0] * kl(h, w))
    g_want = jax.grad(f(lambda h, w: L.token_kl(ref_h @ ref_w, h @ w)), (0, 1))(h, w)
    g_got = jax.grad(f(lambda h, w: L.chunked_token_kl(ref_h, ref_w, h, w, chunk_size=4)), (0, 1))(
        h, w
    )
    _close(g_got, g_want, 1e-5, 1e-5)
