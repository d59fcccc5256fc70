"""LoRA adapters by module surgery: the formula (float64 NumPy), B = 0 equals the base
exactly, merging, the base/adapter split, dropout, validation, abstract models."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mipo_jax.models import CausalLM, ModelConfig, lora
from mipo_jax.models.layers import Dense

TOKENS = (np.arange(24).reshape(2, 12) * 7 + 3) % 64


def tiny(family="llama", **kw) -> ModelConfig:
    base = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=3, num_heads=4,
                num_kv_heads=2, head_dim=8, max_position_embeddings=64)  # fmt: skip
    if family == "gpt2":
        base.update(norm="layer", mlp="plain", position="learned", activation="gelu_new",
                    qkv_bias=True, o_bias=True, mlp_bias=True, num_kv_heads=4)  # fmt: skip
    return ModelConfig(family=family, **{**base, **kw})


@jax.jit
def _forward(graph, state):
    return nnx.merge(graph, state)(TOKENS)


def logits(model) -> np.ndarray:
    """The model's logits on TOKENS, compiled (eager op-by-op dispatch is slow)."""
    return np.asarray(_forward(*nnx.split(model)))


def targets(family):
    return tuple(t for t in lora.TARGETS if not (family == "gpt2" and t == "gate"))


def randomise(model, adapted, seed=0, scale=0.3):
    """Random A and B (B = 0 after `attach`): a model whose adapters change its outputs."""
    key = jax.random.key(seed)
    for i, path in enumerate(adapted.paths):
        m = model
        for p in path:
            m = getattr(m, p)
        for j, name in enumerate(lora.ADAPTER_KEYS):
            var = getattr(m, name)
            var[...] = scale * jax.random.normal(jax.random.fold_in(key, 2 * i + j), var.shape)


@pytest.mark.parametrize(
    "family,scan,dtype",
    [("llama", True, "float32"), ("llama", False, "bfloat16"), ("gpt2", True, "float32")],
)
def test_attached_model_equals_base_exactly(family, scan, dtype):
    cfg = tiny(family, scan_layers=scan, compute_dtype=dtype, param_dtype=dtype)
    model = CausalLM(cfg, rngs=nnx.Rngs(0))
    want = np.asarray(model(TOKENS))
    settings = lora.LoraSettings(rank=4, alpha=8.0, targets=targets(family))
    adapted = lora.attach(model, settings, jax.random.key(1))
    assert len(adapted.paths) == len(settings.targets) and set(adapted.stacks) == {(3,)}
    np.testing.assert_array_equal(np.asarray(model(TOKENS)), want)  # B = 0
    assert lora.is_adapted(model)
    assert model.layers.attn.q.lora_a.dtype == model.layers.attn.q.lora_b.dtype == jnp.float32


def test_projection_equals_float64_reference():
    """y = x·W + b + (α/r)·(x·A)·B for one- and two-axis inputs (q: [d]->[h,k], o: [h,k]->[d])."""
    cfg = tiny(compute_dtype="float32")

    class Holder(nnx.Module):
        def __init__(self, rngs):
            self.q = Dense((32,), (4, 8), ("embed", "heads", "head_dim"), use_bias=True,
                           cfg=cfg, rngs=rngs)  # fmt: skip
            self.o = Dense((4, 8), (32,), ("heads", "head_dim", "embed"), use_bias=False,
                           cfg=cfg, rngs=rngs)  # fmt: skip

    holder = Holder(nnx.Rngs(0))
    holder.q.bias[...] = jax.random.normal(jax.random.key(9), (4, 8))
    adapted = lora.attach(holder, lora.LoraSettings(3, alpha=5.0, targets=("q", "o")),
                          jax.random.key(2))  # fmt: skip
    assert adapted.stacks == ((), ())  # not stacked
    randomise(holder, adapted, seed=3)
    x = np.asarray(jax.random.normal(jax.random.key(4), (2, 5, 32)))
    f64 = lambda v: np.asarray(v[...], np.float64)
    q, o = holder.q, holder.o
    low_rank = np.einsum("btd,dr,rhk->bthk", x, f64(q.lora_a), f64(q.lora_b))
    want_q = np.einsum("btd,dhk->bthk", x, f64(q.kernel)) + f64(q.bias) + 5.0 / 3 * low_rank
    np.testing.assert_allclose(np.asarray(q(jnp.asarray(x))), want_q, rtol=1e-5, atol=1e-5)
    h = want_q.astype(np.float32)
    want_o = np.einsum("bthk,hkd->btd", h, f64(o.kernel)) + 5.0 / 3 * np.einsum(
        "bthk,hkr,rd->btd", h, f64(o.lora_a), f64(o.lora_b)
    )
    np.testing.assert_allclose(np.asarray(o(jnp.asarray(h))), want_o, rtol=1e-5, atol=1e-5)
    # PEFT's initialisation: A ~ U(±1/√fan_in) (kaiming_uniform with a = √5), B = 0
    fresh = Holder(nnx.Rngs(0))
    lora.attach(fresh, lora.LoraSettings(64, targets=("o",)), jax.random.key(5))
    a = np.asarray(fresh.o.lora_a[...])
    assert a.shape == (4, 8, 64) and np.abs(a).max() <= 32**-0.5
    assert np.abs(a).max() > 0.9 * 32**-0.5 and abs(a.mean()) < 0.01
    assert not np.asarray(fresh.o.lora_b[...]).any()


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_merged_model_equals_adapted_model(family):
    model = CausalLM(tiny(family), rngs=nnx.Rngs(0))
    graph0 = nnx.split(model)[0]
    adapted = lora.attach(model, lora.LoraSettings(4, 8.0, targets(family)), jax.random.key(1))
    randomise(model, adapted)
    want = logits(model)
    plain = lora.merged(model)
    assert not lora.is_adapted(plain) and lora.is_adapted(model)  # a copy; model unchanged
    assert nnx.split(plain)[0] == graph0  # the base model's graph: same classes and paths
    got = logits(plain)
    scale = np.abs(want).max()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * scale)
    assert np.abs(want - logits(CausalLM(tiny(family), rngs=nnx.Rngs(0)))).max() > 0.1


def test_split_and_combine_share_arrays():
    model = CausalLM(tiny(), rngs=nnx.Rngs(0))
    base0 = nnx.to_pure_dict(nnx.state(model))
    adapted = lora.attach(
        model, lora.LoraSettings(2, targets=("q", "v", "down")), jax.random.key(0)
    )
    graph, state = nnx.split(model)
    full = nnx.to_pure_dict(state)
    base, adapters = lora.split_params(full)
    assert jax.tree.structure(base) == jax.tree.structure(base0)
    for x, y in zip(jax.tree.leaves(base), jax.tree.leaves(base0), strict=True):
        assert x is y  # attach keeps the base weights' arrays and paths
    assert set(adapters["layers"]) == {"attn", "mlp"} and set(adapters["layers"]["mlp"]) == {"down"}
    assert adapters["layers"]["attn"]["q"]["lora_a"].shape == (3, 32, 2)
    assert adapters["layers"]["attn"]["q"]["lora_b"].shape == (3, 2, 4, 8)
    assert adapters["layers"]["mlp"]["down"]["lora_a"].shape == (3, 48, 2)
    # the closed form of the adapter count: L·r·(in + out) per projection
    assert lora.count(adapters) == 3 * 2 * ((32 + 32) + (32 + 16) + (48 + 32))
    again = lora.combine(base, adapters, adapted)
    assert jax.tree.structure(again) == jax.tree.structure(full)
    np.testing.assert_array_equal(logits(nnx.merge(graph, again)), logits(model))
    with pytest.raises(ValueError, match="both in the base and in the adapters"):
        lora.union(base, base)


def test_adapters_carry_the_kernels_axis_names():
    model = CausalLM(tiny(), rngs=nnx.Rngs(0))
    lora.attach(model, lora.LoraSettings(2, targets=("q", "o")), jax.random.key(0))
    names = lambda v: tuple(v.get_metadata()["out_sharding"])
    q, o = model.layers.attn.q, model.layers.attn.o
    assert names(q.lora_a) == ("layers", "embed", None)
    assert names(q.lora_b) == ("layers", None, "heads", "head_dim")
    assert names(o.lora_a) == ("layers", "heads", "head_dim", None)
    assert names(o.lora_b) == ("layers", None, "embed")
    assert isinstance(q.lora_a, nnx.LoRAParam) and isinstance(q.kernel, nnx.Param)


def test_dropout_masks_the_adapter_input_only():
    x = jnp.asarray(np.random.RandomState(0).randn(64, 256).astype(np.float32)) + 3.0
    key = jax.random.key_data(jax.random.key(7))
    out = np.asarray(lora._dropout(x, key, jnp.float32(0.75)))
    kept = out != 0
    np.testing.assert_allclose(out[kept], np.asarray(x)[kept] / 0.75, rtol=3e-7)  # XLA: x·(1/p)
    frac = 1 - kept.mean()  # 16384 draws: σ ≈ 0.0034
    assert abs(frac - 0.25) < 0.015
    np.testing.assert_array_equal(lora._dropout(x, key, jnp.float32(1.0)), x)  # keep = 1
    # in a model: combine's key draws the masks (train), no key means no dropout (eval)
    model = CausalLM(tiny(), rngs=nnx.Rngs(0))
    want = logits(model)
    settings = lora.LoraSettings(4, targets=("q", "up"), dropout=0.5)
    adapted = lora.attach(model, settings, jax.random.key(1))
    randomise(model, adapted)
    graph, state = nnx.split(model)
    base, adapters = lora.split_params(nnx.to_pure_dict(state))
    run = lambda k: logits(nnx.merge(graph, lora.combine(base, adapters, adapted, k)))
    evaluated = run(None)
    np.testing.assert_array_equal(evaluated, logits(model))  # keep = 1 as attached
    a, b = run(jax.random.key(3)), run(jax.random.key(4))
    assert np.abs(a - evaluated).max() > 1e-3 and np.abs(a - b).max() > 1e-3
    np.testing.assert_array_equal(a, run(jax.random.key(3)))
    assert np.abs(evaluated - want).max() > 1e-3


def test_bad_settings_and_targets_name_the_key():
    with pytest.raises(ValueError, match=r"model.lora.targets='q,qkv'.*unknown projection 'qkv'"):
        lora.LoraSettings(4, targets=("q", "qkv"))
    with pytest.raises(ValueError, match=r"model.lora.rank=-1 must be >= 1"):
        lora.LoraSettings(-1)
    with pytest.raises(ValueError, match=r"model.lora.dropout=1.0 must be in \[0, 1\)"):
        lora.LoraSettings(2, dropout=1.0)
    gpt2 = CausalLM(tiny("gpt2"), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="this model has no 'gate' projection"):
        lora.attach(gpt2, lora.LoraSettings(2), jax.random.key(0))
    model = CausalLM(tiny(), rngs=nnx.Rngs(0))
    lora.attach(model, lora.LoraSettings(2, targets=("q",)), jax.random.key(0))
    with pytest.raises(ValueError, match="already has LoRA adapters"):
        lora.attach(model, lora.LoraSettings(2, targets=("v",)), jax.random.key(0))


def test_attach_on_an_abstract_model():
    def make():
        model = CausalLM(tiny(num_layers=2), rngs=nnx.Rngs(0))
        lora.attach(model, lora.LoraSettings(8), jax.random.key(0))
        return model

    _, state = nnx.split(nnx.eval_shape(make))
    _, adapters = lora.split_params(nnx.to_pure_dict(state))
    leaves = jax.tree.leaves(adapters)
    assert leaves and all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves)
    # q, k, v, o, gate, up, down: (in + out) = 32+32, 32+16, 32+16, 32+32, 32+48, 32+48, 48+32
    assert lora.count(adapters) == 2 * 8 * (64 + 48 + 48 + 64 + 80 + 80 + 80)
