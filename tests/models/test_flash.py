"""Flash attention (`models.flash`) equals float64 softmax attention, and its memory is linear.

References: `numpy_attention` (values) and `numpy_attention_grad`, the closed-form gradient
of softmax attention (dV = Pᵀ dO, dS = P ∘ (dO Vᵀ − rowsum(P ∘ dO Vᵀ)), dQ = scale · dS K,
dK = scale · dSᵀ Q, summed over the query heads of each key/value head), both in float64
over the dense boolean mask of `masks.self_attention_mask`.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mipo_jax.models import CausalLM, ModelConfig
from mipo_jax.models.flash import flash_attention
from mipo_jax.models.masks import attention_span, segment_mask
from mipo_jax.models.transformer import dot_product_attention
from tests.models.test_attention import numpy_attention, packed_rows


def numpy_attention_grad(q, k, v, mask, scale, dout):
    """Float64 (dq, dk, dv) of ``sum(attention(q, k, v) * dout)``."""
    b, t, h, d = q.shape
    n = k.shape[2]
    rep = h // n
    kk, vv = np.repeat(k, rep, axis=2), np.repeat(v, rep, axis=2)
    s = np.where(mask[:, None], np.einsum("bthd,bshd->bhts", q, kk) * scale, -np.inf)
    m = np.max(s, axis=-1, keepdims=True)
    e = np.where(mask[:, None], np.exp(s - np.where(np.isfinite(m), m, 0)), 0.0)
    z = e.sum(-1, keepdims=True)
    p = np.divide(e, z, out=np.zeros_like(e), where=z > 0)
    dv = np.einsum("bhts,bthd->bshd", p, dout)
    dp = np.einsum("bthd,bshd->bhts", dout, vv)
    ds = p * (dp - (dp * p).sum(-1, keepdims=True))
    dq = scale * np.einsum("bhts,bshd->bthd", ds, kk)
    dk = scale * np.einsum("bhts,bthd->bshd", ds, q)
    fold = lambda x: x.reshape(b, t, n, rep, d).sum(3)
    return dq, fold(dk), fold(dv)


def _case(seed, shared_prompt, window, b=3, t=50, h=4, n=2, d=8):
    rng = np.random.default_rng(seed)
    seg, pos, att = packed_rows(rng, b, t, shared_prompt)
    q, k, v = (rng.standard_normal((b, t, x, d)) for x in (h, n, n))
    live = (seg > 0)[..., None, None]
    dout = np.where(live, rng.standard_normal(q.shape), 0.0)  # padding outputs are ignored
    ids = [jnp.asarray(x) for x in (seg, pos)]
    mask = segment_mask(*ids, attend_to=_opt(att), sliding_window=window)
    return (q, k, v, dout), mask, attention_span(seg, att), live


def _opt(x):
    return None if x is None else jnp.asarray(x)


# (block, window): one block; odd and even numbers of diagonals; a ragged last block (13)
@pytest.mark.parametrize("block, window", [(0, None), (8, 5), (13, None), (16, None), (16, 5)])
@pytest.mark.parametrize("shared_prompt", [False, True])
def test_flash_equals_float64_reference(block, window, shared_prompt):
    with jax.enable_x64(True):
        (q, k, v, dout), mask, span, live = _case(block, shared_prompt, window)
        scale = q.shape[-1] ** -0.5
        dense = np.asarray(mask.dense())
        want = numpy_attention(q, k, v, dense, scale)
        want_grads = numpy_attention_grad(q, k, v, dense, scale, dout)
        assert 0 < span < q.shape[1]  # the span really cuts keys off
        for sp in (None, span):

            def loss(q, k, v, sp=sp):
                out = flash_attention(q, k, v, mask, scale=scale, block=block, span=sp)
                return jnp.sum(out * dout), out

            grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2), has_aux=True))
            grads, out = grad(*(jnp.asarray(x) for x in (q, k, v)))
            out = np.asarray(out)
            np.testing.assert_allclose(np.where(live, out, 0), np.where(live, want, 0), atol=1e-12)
            assert not np.any(np.where(live, 0, out))  # padding queries: zeros
            for got, ref, name in zip(grads, want_grads, "qkv"):
                np.testing.assert_allclose(np.asarray(got), ref, atol=1e-12, err_msg=f"d{name}")


def test_flash_one_block_normalises_like_blocked():
    """One block: probabilities normalised before the value matmul, as the blocked path (and
    transformers) computes them, so float32 results agree to the last bits."""
    (q, k, v, _), mask, _, live = _case(0, True, None)
    q, k, v = (jnp.asarray(x, jnp.float32) for x in (q, k, v))
    flash = jax.jit(lambda q, k, v: flash_attention(q, k, v, mask, scale=0.3, block=0))
    blocked = jax.jit(lambda q, k, v: dot_product_attention(q, k, v, mask.dense(), 0.3))
    a, b = np.asarray(flash(q, k, v)), np.asarray(blocked(q, k, v))
    np.testing.assert_allclose(np.where(live, a, 0), np.where(live, b, 0), rtol=1e-6, atol=1e-7)


def test_too_small_span_changes_the_result():
    """The span is a promise about the data: blocks of one token, one place short, and a
    visible key is dropped (with larger blocks the cut falls on block boundaries)."""
    (q, k, v, _), mask, span, live = _case(0, True, None)
    q = jnp.asarray(q, jnp.float32)
    kv = q[:, :, :2]
    run = jax.jit(
        lambda q, sp: flash_attention(q, kv, kv, mask, scale=0.3, block=1, span=sp),
        static_argnums=1,
    )
    diff = np.where(live, np.asarray(run(q, span) - run(q, span - 1)), 0)
    assert np.abs(diff).max() > 1e-3


def _attention_grad_memory(fn, rows: int, t: int) -> int:
    """XLA's temporary bytes of d/d(q, k, v) of one attention call on rows x t tokens."""
    h, n, d = 4, 2, 32
    seg = jnp.ones((rows, t), jnp.int32)
    pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (rows, t))
    mask = segment_mask(seg, pos)
    x = jax.ShapeDtypeStruct((rows, t, h, d), jnp.float32)
    kv = jax.ShapeDtypeStruct((rows, t, n, d), jnp.float32)
    loss = lambda q, k, v: jnp.sum(fn(q, k, v, mask))
    compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(x, kv, kv).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def test_flash_backward_memory_is_linear_in_length():
    """Same tokens per call (rows x T = 2048), T from 256 to 2048: the flash backward's
    temporaries stay flat (they grow with rows x T x block), the blocked ones grow with T."""
    flash = lambda q, k, v, m: flash_attention(q, k, v, m, scale=0.2, block=128)
    blocked = lambda q, k, v, m: dot_product_attention(q, k, v, m.dense(), 0.2, block=128)
    f_short, f_long = (_attention_grad_memory(flash, 2048 // t, t) for t in (256, 2048))
    b_short, b_long = (_attention_grad_memory(blocked, 2048 // t, t) for t in (256, 2048))
    assert f_long <= 1.25 * f_short, (f_short, f_long)
    assert b_long >= 4 * b_short, (b_short, b_long)  # the T² path this replaces
    assert f_long * 2 < b_long


def test_model_flash_equals_blocked():
    """A packed shared-prompt batch through a GQA Mistral with a sliding window: the flash
    model's hidden states and parameter gradients equal the blocked model's (float32: both
    differ from the blocked model with one block by about 5e-7 of each gradient's largest
    entry)."""
    cfg = ModelConfig(
        family="mistral", vocab_size=128, hidden_size=64, intermediate_size=128, num_layers=2,
        num_heads=4, num_kv_heads=2, head_dim=16, sliding_window=9, attention_block=16,
    )  # fmt: skip
    rng = np.random.default_rng(3)
    seg, pos, att = packed_rows(rng, 2, 96, True)
    tokens = jnp.asarray(rng.integers(0, 128, seg.shape))
    live = jnp.asarray(seg > 0)[..., None]
    span = attention_span(seg, att)
    r = jnp.asarray(rng.standard_normal((*seg.shape, 64)), jnp.float32)
    outs = {}
    for impl in ("blocked", "flash"):
        model = CausalLM(dataclasses.replace(cfg, attention_impl=impl), rngs=nnx.Rngs(0))
        graph, params = nnx.split(model)

        def loss(p, graph=graph):
            h = nnx.merge(graph, p).hidden(
                tokens, jnp.asarray(pos), jnp.asarray(seg), attend_to=jnp.asarray(att), span=span
            )
            return jnp.sum(jnp.where(live, h, 0) * r), h

        outs[impl] = jax.jit(jax.grad(loss, has_aux=True))(params)
    (g_b, h_b), (g_f, h_f) = outs["blocked"], outs["flash"]
    np.testing.assert_allclose(np.where(live, h_f, 0), np.where(live, h_b, 0), atol=2e-5, rtol=2e-5)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g_f), jax.tree.leaves(g_b)):
        scale = float(jnp.max(jnp.abs(b)))
        np.testing.assert_allclose(a, b, atol=1e-5 * scale, err_msg=jax.tree_util.keystr(path))


def test_unknown_implementation_is_refused():
    with pytest.raises(ValueError, match="attention_impl"):
        ModelConfig(
            family="llama", vocab_size=8, hidden_size=8, intermediate_size=8, num_layers=1,
            num_heads=1, num_kv_heads=1, head_dim=8, attention_impl="fast",
        )  # fmt: skip


def test_flash_under_a_mesh_equals_one_device():
    """Rows and heads sharded (GSPMD): values and gradients equal the unsharded ones."""
    from mipo_jax.sharding import make_mesh, named_sharding

    (q, k, v, dout), mask, span, _ = _case(7, True, None, b=4, t=40)
    q, k, v, dout = (jnp.asarray(x, jnp.float32) for x in (q, k, v, dout))
    mesh = make_mesh((2, 2, 2))
    put = lambda x, names: jax.device_put(x, named_sharding(names, x.shape, mesh))

    def loss(q, k, v):
        out = flash_attention(q, k, v, mask, scale=0.3, block=8, span=span)
        return jnp.sum(out * dout), out

    grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2), has_aux=True))
    want = grad(q, k, v)
    heads = ("batch", "seq", "heads", "head_dim")
    kv_heads = ("batch", "seq", "kv_heads", "head_dim")
    q, dout, k, v = put(q, heads), put(dout, heads), put(k, kv_heads), put(v, kv_heads)
    mask = jax.tree.map(lambda x: put(x, ("batch", "seq")), mask)
    assert q.sharding.spec == jax.sharding.PartitionSpec(("data", "fsdp"), None, "tensor", None)
    with jax.set_mesh(mesh):
        got = grad(q, k, v)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6, rtol=1e-6)
