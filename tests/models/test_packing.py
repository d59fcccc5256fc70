"""Masks: packed sequences and shared prompts equal separate runs; remat, scan, dtypes."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mipo_jax.models import CausalLM, ModelConfig
from mipo_jax.models.masks import attention_mask, positions_from_segments, self_attention_mask

BASE = dict(
    vocab_size=128, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
    num_kv_heads=2, head_dim=16,
)  # fmt: skip
CONFIGS = {
    "llama": ModelConfig(family="llama", **BASE),
    "mistral_window4": ModelConfig(family="mistral", sliding_window=4, **BASE),
    "qwen3": ModelConfig(family="qwen3", qk_norm=True, qkv_bias=True, **BASE),
    "gpt2": ModelConfig(
        family="gpt2",
        norm="layer",
        mlp="plain",
        activation="gelu_new",
        position="learned",
        qkv_bias=True,
        o_bias=True,
        mlp_bias=True,
        tie_embeddings=True,
        **BASE,
    ),  # fmt: skip
}


def _model(name: str, **policy) -> CausalLM:
    return CausalLM(dataclasses.replace(CONFIGS[name], **policy), rngs=nnx.Rngs(0))


@nnx.jit
def _forward(model, tokens, positions=None, segment_ids=None, attend_to=None):
    return model(tokens, positions, segment_ids, attend_to=attend_to)


def _alone(model, seq):
    return np.asarray(_forward(model, jnp.asarray([seq])))[0]


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_packed_segments_equal_separate_sequences(name):
    model = _model(name)
    rng = np.random.RandomState(0)
    a, b = list(rng.randint(0, 128, 7)), list(rng.randint(0, 128, 5))
    tokens = np.array([a + b + [0, 0]])
    seg = np.array([[1] * 7 + [2] * 5 + [0, 0]])
    pos = np.asarray(positions_from_segments(jnp.asarray(seg)))
    np.testing.assert_array_equal(pos[0], list(range(7)) + list(range(5)) + [0, 0])
    packed = np.asarray(_forward(model, tokens, pos, seg))[0]
    np.testing.assert_allclose(packed[:7], _alone(model, a), atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(packed[7:12], _alone(model, b), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_shared_prompt_completions_equal_prompt_plus_each(name):
    model = _model(name)
    rng = np.random.RandomState(1)
    p, c, r = (list(rng.randint(0, 128, n)) for n in (4, 3, 5))
    tokens = np.array([p + c + r + [0]])
    seg = np.array([[1] * 4 + [2] * 3 + [3] * 5 + [0]])
    pos = np.array([list(range(4)) + list(range(4, 7)) + list(range(4, 9)) + [0]])
    attend_to = np.array([[0] * 4 + [1] * 3 + [1] * 5 + [0]])
    shared = np.asarray(_forward(model, tokens, pos, seg, attend_to))[0]
    with_c, with_r = _alone(model, p + c), _alone(model, p + r)
    np.testing.assert_allclose(shared[:4], with_c[:4], atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(shared[4:7], with_c[4:], atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(shared[7:12], with_r[4:], atol=1e-5, rtol=1e-5)


def test_mask_convention():
    seg = jnp.array([[1, 1, 2, 2, 3, 0]])
    pos = jnp.array([[0, 1, 2, 3, 2, 0]])
    attend = jnp.array([[0, 0, 1, 1, 1, 0]])
    m = np.asarray(self_attention_mask(seg, pos, attend_to=attend))[0].astype(int)
    want = [
        [1, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0],  # segment 2 sees the prompt (segment 1) and itself
        [1, 1, 1, 1, 0, 0],
        [1, 1, 0, 0, 1, 0],  # segment 3 sees the prompt, not segment 2
        [0, 0, 0, 0, 0, 0],  # padding sees nothing
    ]
    np.testing.assert_array_equal(m, want)
    w = np.asarray(self_attention_mask(seg, pos, attend_to=attend, sliding_window=2))[0]
    assert not w[3, 1] and w[3, 2] and w[4, 1] and not w[4, 0]  # pos 3-1=2 >= 2: hidden
    idx = jnp.arange(6)[None]
    plain = np.asarray(attention_mask(seg, seg, idx, idx))[0]
    np.testing.assert_array_equal(plain, np.asarray(self_attention_mask(seg, pos))[0])
    assert plain[2, 2] and not plain[2, 0]  # without attend_to, segments are isolated


def test_hidden_times_unembed_is_logits():
    for name in ("llama", "gpt2"):
        model = _model(name)
        tokens = jnp.arange(20).reshape(2, 10)
        h, w = nnx.jit(lambda m, t: (m.hidden(t), m.unembed_weight()))(model, tokens)
        assert h.shape == (2, 10, 64) and w.shape == (64, 128)
        np.testing.assert_allclose(h @ w, _forward(model, tokens), atol=1e-5, rtol=1e-5)


def _grads(model, tokens):
    def loss(m):
        logp = jax.nn.log_softmax(m(tokens), axis=-1)
        return -jnp.mean(jnp.take_along_axis(logp[:, :-1], tokens[:, 1:, None], axis=-1))

    return jax.jit(nnx.grad(loss))(model)


def test_remat_and_scan_keep_gradients():
    tokens = jnp.asarray(np.random.RandomState(2).randint(0, 128, (2, 9)))
    want = nnx.to_flat_state(_grads(_model("llama", remat="none"), tokens))
    cases = [("full", True), ("dots_with_no_batch_dims_saveable", False)]
    for remat, scan in cases:
        got = nnx.to_flat_state(_grads(_model("llama", remat=remat, scan_layers=scan), tokens))
        for (path, a), (_, b) in zip(want, got, strict=True):
            np.testing.assert_allclose(b[...], a[...], atol=1e-6, rtol=1e-5, err_msg=str(path))


def test_bfloat16_compute_keeps_float32_params():
    f32, bf16 = _model("llama"), _model("llama", compute_dtype="bfloat16")
    assert bf16.layers.attn.q.kernel[...].dtype == jnp.float32
    tokens = jnp.arange(16).reshape(2, 8)
    assert nnx.jit(lambda m, t: m.hidden(t))(bf16, tokens).dtype == jnp.bfloat16
    logits = _forward(bf16, tokens)
    assert logits.dtype == jnp.float32
    # bf16 rounding only: relative error of order 2^-8 per op, far from a wrong model.
    ref = _forward(f32, tokens)
    assert float(jnp.max(jnp.abs(logits - ref))) < 0.05 * float(jnp.max(jnp.abs(ref)))
