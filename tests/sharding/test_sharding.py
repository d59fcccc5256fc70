"""DP, FSDP, TP and mixed meshes give the same logits (and gradients) as one device."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers
from flax import nnx
from jax.sharding import PartitionSpec as P

from mipo_jax.hf.load import load_pretrained, param_table
from mipo_jax.sharding import RULES, fill_sizes, logical_to_spec, make_mesh, use_rules
from tests.hf.test_load import _BASE, randomise

MESHES = {
    "dp": (8, 1, 1),
    "fsdp": (1, 8, 1),
    "tp": (1, 1, 8),
    "dp_fsdp": (2, 4, 1),
    "fsdp_tp": (1, 2, 4),
    "mixed": (2, 2, 2),
}


def test_fill_sizes_and_mesh():
    assert fill_sizes((-1, 2, 1), 8) == (4, 2, 1)
    assert fill_sizes((2, 2, 2), 8) == (2, 2, 2)
    for bad in [(-1, -1, 1), (3, -1, 1), (2, 2, 1), (0, 8, 1)]:
        with pytest.raises(ValueError):
            fill_sizes(bad, 8)
    mesh = make_mesh((1, -1, 2))
    assert mesh.axis_names == ("data", "fsdp", "tensor") and mesh.axis_sizes == (1, 4, 2)
    assert make_mesh((2, 1, 1), devices=jax.devices()[:2]).size == 2


def test_logical_to_spec():
    mesh = make_mesh((2, 2, 2))
    assert logical_to_spec(("batch", "seq", "act_embed"), (8, 5, 64), mesh) == P(
        ("data", "fsdp"), None, None
    )
    assert logical_to_spec(("layers", "embed", "heads", "head_dim"), (2, 64, 4, 16), mesh) == P(
        None, "fsdp", "tensor", None
    )
    # A dimension the mesh axis does not divide stays replicated (1 KV head, batch 3).
    assert logical_to_spec(("embed", "kv_heads"), (64, 1), mesh) == P("fsdp", None)
    assert logical_to_spec(("batch", "vocab"), (2, 128), mesh) == P("data", "tensor")
    assert logical_to_spec(("batch",), (3,), mesh) == P(None)
    with pytest.raises(ValueError, match="unknown logical axis name 'embd'"):
        logical_to_spec(("embd",), (64,), mesh)
    with use_rules((("vocab", "fsdp"),)):
        assert logical_to_spec(("vocab", "embed"), (128, 64), mesh) == P("fsdp", None)
    assert len(RULES) <= 10


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """Llama with 8 query heads and 4 KV heads (head_dim 8) so 'tensor' up to 8 divides."""
    folder = tmp_path_factory.mktemp("llama_tp")
    config = {**_BASE, "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 8}
    randomise(transformers.LlamaForCausalLM(transformers.LlamaConfig(**config))).save_pretrained(
        folder
    )
    return folder


@pytest.fixture(scope="module")
def unsharded(folder):
    model = load_pretrained(folder)
    tokens, positions, segments = _batch()
    return _logits(model, tokens, positions, segments), _grads(model, tokens)


def _batch():
    rng = np.random.RandomState(0)
    tokens = rng.randint(0, 256, (8, 12))
    segments = (np.arange(12)[None] < rng.randint(4, 13, (8, 1))).astype(np.int32)
    return tokens, np.broadcast_to(np.arange(12), (8, 12)), segments


@nnx.jit
def _logits(model, tokens, positions, segments):
    return model(tokens, positions, segments)


@nnx.jit
def _grads(model, tokens):
    def loss(m):
        return jnp.mean(jax.nn.logsumexp(m(tokens), axis=-1))

    return nnx.grad(loss)(model)


@pytest.mark.parametrize("name", sorted(MESHES))
def test_sharded_logits_equal_single_device(folder, unsharded, name):
    mesh = make_mesh(MESHES[name])
    with jax.set_mesh(mesh):
        model = load_pretrained(folder, mesh=mesh)
        tokens, positions, segments = _batch()
        batch_sharding = jax.NamedSharding(mesh, P(("data", "fsdp")))
        args = [jax.device_put(x, batch_sharding) for x in (tokens, positions, segments)]
        got = _logits(model, *args)
    params = param_table(model)
    q = params["layers.attn.q.kernel"][...].sharding
    data, fsdp, tensor = MESHES[name]
    want = P(None, "fsdp" if fsdp > 1 else None, "tensor" if tensor > 1 else None, None)
    assert q.is_equivalent_to(jax.NamedSharding(mesh, want), 4), (q, want)
    batch_axes = tuple(a for a, n in (("data", data), ("fsdp", fsdp)) if n > 1) or None
    want = P(batch_axes, None, "tensor" if tensor > 1 else None)
    assert got.sharding.is_equivalent_to(jax.NamedSharding(mesh, want), 3), (got.sharding, want)
    np.testing.assert_allclose(np.asarray(got), unsharded[0], atol=1e-5, rtol=1e-5)
    if name == "mixed":
        with jax.set_mesh(mesh):
            grads = _grads(model, args[0])
        for (path, a), (_, b) in zip(
            nnx.to_flat_state(unsharded[1]), nnx.to_flat_state(grads), strict=True
        ):
            np.testing.assert_allclose(b[...], a[...], atol=1e-6, rtol=1e-5, err_msg=str(path))
