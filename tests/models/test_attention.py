"""Blocked attention (query blocks, causal key ranges, a data-given span) equals full attention.

The reference is a float64 NumPy attention over the boolean mask; `masks.attention_span` is
checked against the largest ``q - k + 1`` over the visible pairs of `self_attention_mask`.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mipo_jax.models import CausalLM, ModelConfig
from mipo_jax.models.masks import attention_span, self_attention_mask
from mipo_jax.models.transformer import dot_product_attention as _attention

# jitted (an eager run dispatches every block's ops one by one); scale, block, span static
dot_product_attention = jax.jit(_attention, static_argnums=4, static_argnames=("block", "span"))


def packed_rows(rng, rows: int, length: int, shared_prompt: bool):
    """Segment ids, positions and attend_to of rows packed with random units (and padding).

    A unit is one sequence, or (shared prompt) ``prompt | chosen | rejected`` where both
    completions attend to the prompt.
    """
    seg = np.zeros((rows, length), np.int32)
    att = np.zeros((rows, length), np.int32)
    pos = np.zeros((rows, length), np.int32)
    for r in range(rows):
        i, s = 0, 1
        while True:
            parts = rng.integers(1, 12, 3 if shared_prompt else 1)
            if i + parts.sum() > length - rng.integers(0, 6):
                break
            start = i
            for j, n in enumerate(parts):
                seg[r, i : i + n] = s + j
                if j:
                    att[r, i : i + n] = s
                    pos[r, i : i + n] = parts[0] + np.arange(n)
                else:
                    pos[r, i : i + n] = np.arange(n)
                i += n
            assert i > start
            s += len(parts)
    return seg, pos, (att if shared_prompt else None)


def numpy_attention(q, k, v, mask, scale):
    """Float64 reference: softmax over the visible keys (rows with none give zeros)."""
    b, t, h, d = q.shape
    n = k.shape[2]
    rep = h // n
    kk, vv = np.repeat(k, rep, axis=2), np.repeat(v, rep, axis=2)
    s = np.einsum("bthd,bshd->bhts", q, kk) * scale
    s = np.where(mask[:, None], s, -np.inf)
    m = np.max(s, axis=-1, keepdims=True)
    e = np.where(mask[:, None], np.exp(s - np.where(np.isfinite(m), m, 0)), 0.0)
    z = e.sum(-1, keepdims=True)
    p = np.divide(e, z, out=np.zeros_like(e), where=z > 0)
    return np.einsum("bhts,bshd->bthd", p, vv)


@pytest.mark.parametrize("shared_prompt", [False, True])
def test_attention_span_is_the_longest_visible_reach(shared_prompt):
    rng = np.random.default_rng(1)
    for _ in range(5):
        seg, pos, att = packed_rows(rng, 3, 50, shared_prompt)
        mask = np.asarray(self_attention_mask(jnp.asarray(seg), jnp.asarray(pos), attend_to=att))
        _, qi, ki = np.nonzero(mask)
        assert attention_span(seg, att) == int((qi - ki).max()) + 1
    assert attention_span(np.zeros((2, 5), np.int32)) == 0


@pytest.mark.parametrize("block", [0, 8, 13, 64])
@pytest.mark.parametrize("shared_prompt", [False, True])
def test_blocked_attention_equals_reference(block, shared_prompt):
    rng = np.random.default_rng(block)
    b, t, h, n, d = 3, 50, 4, 2, 8
    seg, pos, att = packed_rows(rng, b, t, shared_prompt)
    mask = self_attention_mask(jnp.asarray(seg), jnp.asarray(pos), attend_to=att)
    span = attention_span(seg, att)
    assert 0 < span < t  # the span really cuts keys off
    q, k, v = (rng.standard_normal((b, t, x, d)) for x in (h, n, n))
    scale = d**-0.5
    want = numpy_attention(q, k, v, np.asarray(mask), scale)
    live = np.asarray(seg > 0)[..., None, None]  # padding queries are ignored downstream
    with jax.enable_x64(True):
        args = (jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), mask, scale)
        for sp in (None, span):
            got = np.asarray(dot_product_attention(*args, block=block, span=sp))
            np.testing.assert_allclose(np.where(live, got, 0), np.where(live, want, 0), atol=1e-12)

        def loss(q, k, v, sp, blk):
            out = dot_product_attention(q, k, v, mask, scale, block=blk, span=sp)
            return jnp.sum(jnp.where(jnp.asarray(live), out, 0) * jnp.asarray(want))

        grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2)), static_argnums=(3, 4))
        grads, blocked = grad(*args[:3], None, 0), grad(*args[:3], span, block)
        for a, c in zip(grads, blocked):
            np.testing.assert_allclose(np.asarray(c), np.asarray(a), atol=1e-12)


def test_too_small_span_changes_the_result():
    """The span is a promise about the data: one place short, a visible key is dropped."""
    rng = np.random.default_rng(0)
    seg, pos, att = packed_rows(rng, 2, 50, True)
    mask = self_attention_mask(jnp.asarray(seg), jnp.asarray(pos), attend_to=att)
    span = attention_span(seg, att)
    q = jnp.asarray(rng.standard_normal((2, 50, 2, 8)), jnp.float32)
    full = dot_product_attention(q, q, q, mask, 0.3, block=8, span=span)
    short = dot_product_attention(q, q, q, mask, 0.3, block=8, span=span - 1)
    assert float(jnp.max(jnp.abs(full - short))) > 1e-3


def test_model_blocked_with_span_equals_one_block():
    """A packed shared-prompt batch through the model: block 16 with the span == one block."""
    cfg = ModelConfig(
        family="llama", vocab_size=128, hidden_size=64, intermediate_size=128, num_layers=2,
        num_heads=4, num_kv_heads=2, head_dim=16,
    )  # fmt: skip
    rng = np.random.default_rng(3)
    seg, pos, att = packed_rows(rng, 2, 96, True)
    tokens = jnp.asarray(rng.integers(0, 128, seg.shape))
    outs = {}
    for block, span in ((0, None), (16, None), (16, attention_span(seg, att))):
        model = CausalLM(dataclasses.replace(cfg, attention_block=block), rngs=nnx.Rngs(0))
        hidden = nnx.jit(lambda m, *a, span=span: m.hidden(*a, attend_to=att, span=span))
        h = hidden(model, tokens, jnp.asarray(pos), jnp.asarray(seg))
        outs[block, span] = np.where((seg > 0)[..., None], np.asarray(h), 0)
    one = outs[0, None]
    for key, h in outs.items():
        np.testing.assert_allclose(h, one, atol=2e-5, rtol=2e-5, err_msg=str(key))


def test_negative_block_is_refused():
    with pytest.raises(ValueError, match="attention_block"):
        ModelConfig(
            family="llama", vocab_size=8, hidden_size=8, intermediate_size=8, num_layers=1,
            num_heads=1, num_kv_heads=1, head_dim=8, attention_block=-1,
        )  # fmt: skip
