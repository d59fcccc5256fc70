"""Attention dispatch (`models.attention`) and the vendor kernels' mask handling (`models.kernels`).

No GPU or TPU runs these tests. cuDNN's arguments are checked by running the very same
`jax.nn.dot_product_attention` call with ``implementation="xla"``; splash runs in Pallas'
interpreter on the CPU. Which branch runs (kernel or pure-JAX flash) is checked exactly.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mipo_jax.models import attention, kernels
from mipo_jax.models.flash import flash_attention
from mipo_jax.models.masks import attention_span, segment_mask
from tests.models.test_attention import numpy_attention, packed_rows
from tests.models.test_flash import numpy_attention_grad


def test_auto_picks_by_backend_and_kernels_need_theirs():
    assert attention.resolve("auto", "cpu") == "flash"
    assert attention.resolve("auto", "gpu") == "cudnn"
    assert attention.resolve("auto", "tpu") == "splash"
    assert attention.resolve("flash", "tpu") == "flash"
    assert attention.resolve("blocked", "gpu") == "blocked"
    assert attention.resolve("auto") == "flash"  # this machine
    with pytest.raises(ValueError, match="'cudnn' runs on GPU only.*'flash'"):
        attention.resolve("cudnn", "cpu")
    with pytest.raises(ValueError, match="'splash' runs on TPU only"):
        attention.resolve("splash", "gpu")


def _right_padded(rng, rows, t, lengths, start=0):
    seg = (np.arange(t)[None] < np.asarray(lengths)[:, None]).astype(np.int32)
    pos = np.where(seg > 0, start + np.arange(t)[None], 0).astype(np.int32)
    return seg, pos


def test_cudnn_static_support():
    seg = jnp.ones((2, 16), jnp.int32)
    q = jnp.zeros((2, 16, 4, 64), jnp.bfloat16)
    assert kernels.cudnn_unsupported(q, segment_mask(seg, seg)) is None
    assert "attend_to" in kernels.cudnn_unsupported(q, segment_mask(seg, seg, attend_to=seg))
    assert "bfloat16" in kernels.cudnn_unsupported(q.astype(jnp.float32), segment_mask(seg, seg))
    wide = jnp.zeros((2, 16, 4, 256), jnp.bfloat16)
    assert "head_dim" in kernels.cudnn_unsupported(wide, segment_mask(seg, seg))
    assert "128" in kernels.splash_unsupported(q, segment_mask(seg, seg))


def test_one_sequence_per_row_predicate():
    rng = np.random.default_rng(0)
    seg, pos = _right_padded(rng, 3, 12, [12, 5, 0])
    ok = lambda s, p, w=None: bool(
        kernels.one_sequence_per_row(segment_mask(s, p, sliding_window=w))[0]
    )
    assert ok(seg, pos) and ok(seg, pos + 7 * (seg > 0), 4)  # positions may start anywhere
    packed, ppos, _ = packed_rows(rng, 3, 12, False)
    assert not ok(packed, ppos)
    left = seg[:, ::-1].copy()  # left padding
    assert not ok(left, pos)
    jump = pos.copy()
    jump[0, 6:] += 1  # a position gap: cuDNN's window would count places, not positions
    assert ok(seg, jump) and not ok(seg, jump, 4)
    lengths = kernels.one_sequence_per_row(segment_mask(seg, pos))[1]
    assert lengths.tolist() == [12, 5, 1]  # an empty row reads one padding key (finite)


@pytest.mark.parametrize("window", [None, 5])
def test_cudnn_arguments_give_the_reference(window):
    """The call `cudnn_attention` makes, run by XLA: right-padded rows, GQA, window."""
    rng = np.random.default_rng(1)
    seg, pos = _right_padded(rng, 3, 24, [24, 17, 3])
    q, k, v = (rng.standard_normal((3, 24, x, 8)).astype(np.float32) for x in (4, 2, 2))
    mask = segment_mask(jnp.asarray(seg), jnp.asarray(pos), sliding_window=window)
    want = numpy_attention(
        *(x.astype(np.float64) for x in (q, k, v)), np.asarray(mask.dense()), 0.3
    )
    got = jax.jit(
        lambda q, k, v: kernels.cudnn_attention(q, k, v, mask, scale=0.3, implementation="xla")
    )
    np.testing.assert_allclose(np.asarray(got(q, k, v)), want, atol=2e-6)  # zeros at padding


def test_cudnn_dispatch_runs_flash_where_cudnn_cannot():
    rng = np.random.default_rng(2)
    q, k, v = (jnp.asarray(rng.standard_normal((2, 32, x, 16)), jnp.bfloat16) for x in (4, 2, 2))
    args = dict(scale=0.25, block=16, span=None)
    run = jax.jit(
        lambda q, k, v, m: kernels.cudnn_or_flash(q, k, v, m, implementation="xla", **args)
    )
    flash = jax.jit(lambda q, k, v, m: flash_attention(q, k, v, m, **args))
    cudnn = jax.jit(
        lambda q, k, v, m: kernels.cudnn_attention(q, k, v, m, scale=0.25, implementation="xla")
    )
    single = segment_mask(*(jnp.asarray(x) for x in _right_padded(rng, 2, 32, [32, 20])))
    packed_seg, packed_pos, att = packed_rows(rng, 2, 32, True)
    packed = segment_mask(jnp.asarray(packed_seg), jnp.asarray(packed_pos))
    shared = segment_mask(
        jnp.asarray(packed_seg), jnp.asarray(packed_pos), attend_to=jnp.asarray(att)
    )
    assert np.array_equal(run(q, k, v, single), cudnn(q, k, v, single))  # on device: cuDNN
    assert not np.array_equal(cudnn(q, k, v, packed), flash(q, k, v, packed))
    assert np.array_equal(run(q, k, v, packed), flash(q, k, v, packed))  # on device: flash
    assert np.array_equal(run(q, k, v, shared), flash(q, k, v, shared))  # at trace time
    f32 = lambda x: x.astype(jnp.float32)
    assert np.array_equal(
        run(f32(q), f32(k), f32(v), single), flash(f32(q), f32(k), f32(v), single)
    )


def test_positions_follow_index_predicate():
    rng = np.random.default_rng(3)
    seg, pos, _ = packed_rows(rng, 3, 40, False)
    check = lambda s, p: bool(kernels.positions_follow_index(segment_mask(s, p, sliding_window=3)))
    assert check(seg, pos)
    gap = pos.copy()
    gap[seg == 2] += 1  # positions of one segment shifted: still rising by one
    assert check(seg, gap)
    gap[0, np.flatnonzero(seg[0] == 1)[-1]] += 1  # a jump inside segment 1
    assert not check(seg, gap)
    split = seg.copy()
    split[0, seg[0] == 3] = 1  # segment 1 again after segment 2: two runs
    assert not check(split, pos)


def test_splash_in_interpreter_equals_reference():
    """Splash (Pallas interpreter on the CPU): packed GQA rows with a span and a window,
    values and gradients against float64; padding queries give zeros."""
    rng = np.random.default_rng(4)
    b, t, h, n, d = 2, 256, 4, 2, 32
    seg, pos, _ = packed_rows(rng, b, t, False)
    span = attention_span(seg)
    q, k, v = (rng.standard_normal((b, t, x, d)).astype(np.float32) for x in (h, n, n))
    live = (seg > 0)[..., None, None]
    dout = np.where(live, rng.standard_normal(q.shape), 0.0).astype(np.float32)
    mask = segment_mask(jnp.asarray(seg), jnp.asarray(pos), sliding_window=7)
    dense = np.asarray(mask.dense())
    f64 = [x.astype(np.float64) for x in (q, k, v)]
    want = numpy_attention(*f64, dense, d**-0.5)
    want_grads = numpy_attention_grad(*f64, dense, d**-0.5, dout.astype(np.float64))

    def loss(q, k, v):
        out = kernels.splash_attention(q, k, v, mask, scale=d**-0.5, span=span, interpret=True)
        return jnp.sum(out * dout), out

    grads, out = jax.jit(jax.grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
    np.testing.assert_allclose(np.asarray(out), np.where(live, want, 0), atol=2e-6)
    for got, ref in zip(grads, want_grads):
        np.testing.assert_allclose(np.asarray(got), ref, atol=2e-5 * np.abs(ref).max())


def test_splash_dispatch_runs_flash_where_splash_cannot():
    rng = np.random.default_rng(5)
    q, k, v = (jnp.asarray(rng.standard_normal((1, 128, x, 16)), jnp.float32) for x in (2, 1, 1))
    seg, pos, att = packed_rows(rng, 1, 128, True)
    args = dict(scale=0.25, block=32, span=None)
    run = jax.jit(lambda q, k, v, m: kernels.splash_or_flash(q, k, v, m, interpret=True, **args))
    flash = jax.jit(lambda q, k, v, m: flash_attention(q, k, v, m, **args))
    shared = segment_mask(jnp.asarray(seg), jnp.asarray(pos), attend_to=jnp.asarray(att))
    assert np.array_equal(run(q, k, v, shared), flash(q, k, v, shared))  # attend_to
    jump = pos.copy()
    jump[0, 1] += 1  # positions that do not follow the row: the window needs flash
    windowed = segment_mask(jnp.asarray(seg), jnp.asarray(jump), sliding_window=4)
    assert np.array_equal(run(q, k, v, windowed), flash(q, k, v, windowed))


@pytest.mark.parametrize("mesh_shape", [(2, 1, 2), (1, 2, 4)])
def test_splash_under_a_mesh(mesh_shape):
    """shard_map over rows and heads; 2 kv heads on a 4-way tensor axis are repeated."""
    from mipo_jax.sharding import make_mesh

    rng = np.random.default_rng(6)
    b, t, h, n, d = 4, 128, 4, 2, 16
    seg, pos, _ = packed_rows(rng, b, t, False)
    q, k, v = (rng.standard_normal((b, t, x, d)).astype(np.float32) for x in (h, n, n))
    mask = segment_mask(jnp.asarray(seg), jnp.asarray(pos))
    f64 = [x.astype(np.float64) for x in (q, k, v)]
    want = np.where(
        (seg > 0)[..., None, None], numpy_attention(*f64, np.asarray(mask.dense()), 0.25), 0
    )
    mesh = make_mesh(mesh_shape, devices=jax.devices()[: int(np.prod(mesh_shape))])
    run = lambda q, k, v, m: kernels.splash_attention(
        q, k, v, m, scale=0.25, span=None, interpret=True
    )
    with jax.set_mesh(mesh):
        out = jax.jit(run)(q, k, v, mask)
    np.testing.assert_allclose(np.asarray(out), want, atol=2e-6)
