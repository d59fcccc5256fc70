"""SparsePO's mask network (`mipo_jax.train.sparsepo.SparseMasks`) against the original's.

The original is huawei-noah/HEBO SparsePO ``SimpleMaskAllLayers`` (``src/masks/mask_models.py``)
fed with the reference's ``hidden_states[1:]`` at the prediction positions
(``src/masks/pipeline_*.py``). ``TorchMaskAllLayers`` below restates its forward pass in
PyTorch (eval mode: its dropouts are identities).
"""

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np
import pytest
import torch
from flax import nnx

from mipo_jax.losses import loss_config
from mipo_jax.train import inputs as train_inputs
from mipo_jax.train import state as st
from mipo_jax.train import step as sp
from mipo_jax.train.sparsepo import SparseMasks
from tests.train.test_step import (  # noqa: F401 (fast_compile: an autouse fixture)
    TINY,
    fast_compile,
    make_spec,
    models,
    one_device_mesh,
    random_batch,
)


class TorchMaskAllLayers(torch.nn.Module):
    """The original's structure: one LayerNorm shared by the layers, per layer Linear(D→1)
    and ReLU, a bias-free Linear(L→1) mixer over the concatenated scores, ReLU."""

    def __init__(self, num_layers: int, width: int, eps: float):
        super().__init__()
        self.w_per_layer = torch.nn.ModuleList(
            [torch.nn.Linear(width, 1) for _ in range(num_layers)]
        )
        self.mixer = torch.nn.Linear(num_layers, 1, bias=False)
        self.layer_norm = torch.nn.LayerNorm(width, eps=eps)

    def forward(self, per_layer):
        scores = [torch.relu(w(self.layer_norm(h))) for w, h in zip(self.w_per_layer, per_layer)]
        return torch.relu(self.mixer(torch.cat(scores, -1)))  # (..., 1)


def flat_shapes(module: nnx.Module) -> dict:
    return {
        ".".join(map(str, path)): tuple(v.shape)
        for path, v in nnx.to_flat_state(nnx.state(module, nnx.Param))
    }


def load_torch(net, torch_net: TorchMaskAllLayers) -> None:
    """Copy the torch parameters into one `MaskNet` (the L Linear maps stacked)."""
    as_np = lambda t: jnp.asarray(t.detach().numpy())
    net.norm.scale[...] = as_np(torch_net.layer_norm.weight)
    net.norm.bias[...] = as_np(torch_net.layer_norm.bias)
    net.layer_kernel[...] = as_np(torch.cat([w.weight for w in torch_net.w_per_layer]))
    net.layer_bias[...] = as_np(torch.cat([w.bias for w in torch_net.w_per_layer]))
    net.mixer[...] = as_np(torch_net.mixer.weight[0])


@pytest.mark.parametrize("independent", [False, True])
def test_structure_and_outputs_match_the_original(independent):
    n_layers, width, eps = 3, 16, 1e-5
    masks = SparseMasks(n_layers, width, independent, eps=eps, rngs=nnx.Rngs(0))
    torch.manual_seed(0)
    originals = [TorchMaskAllLayers(n_layers, width, eps) for _ in range(1 + independent)]
    want_count = sum(p.numel() for t in originals for p in t.parameters())
    assert want_count == (1 + independent) * (2 * width + n_layers * (width + 1) + n_layers)
    got = flat_shapes(masks)
    assert sum(int(np.prod(s)) for s in got.values()) == want_count
    net_shapes = {
        "norm.scale": (width,),
        "norm.bias": (width,),
        "layer_kernel": (n_layers, width),
        "layer_bias": (n_layers,),
        "mixer": (n_layers,),
    }
    names = ("reward", "kl") if independent else ("reward",)
    assert got == {f"{n}.{k}": s for n in names for k, s in net_shapes.items()}

    for t in originals:  # random parameters, so a wrong mapping or order shows
        with torch.no_grad():
            for p in t.parameters():
                p.copy_(0.5 * torch.randn_like(p) + (1.0 if p.shape == (width,) else 0.0))
    for name, t in zip(names, originals, strict=True):
        load_torch(getattr(masks, name), t)
    hs = np.random.default_rng(1).normal(size=(n_layers, 4, 2, 5, width)).astype(np.float32)
    with torch.no_grad():
        want = [t(list(torch.from_numpy(hs))).squeeze(-1).numpy() for t in originals]
    m_u, m_d = masks(jnp.asarray(hs), None, 0.0)
    assert (m_d is None) == (not independent)
    np.testing.assert_allclose(m_u, want[0], rtol=1e-5, atol=1e-6)
    if independent:
        np.testing.assert_allclose(m_d, want[1], rtol=1e-5, atol=1e-6)
        assert not np.allclose(m_u, m_d)  # two nets, two masks


def test_initialisation_is_the_originals():
    """transformers' `_init_weights` on the original's missing mask keys: Linear weights
    N(0, 0.02), biases 0, LayerNorm 1 and 0; so the masks start near 0, not at 1."""
    net = SparseMasks(8, 256, False, eps=1e-5, rngs=nnx.Rngs(0)).reward
    np.testing.assert_array_equal(net.norm.scale[...], 1.0)
    np.testing.assert_array_equal(net.norm.bias[...], 0.0)
    np.testing.assert_array_equal(net.layer_bias[...], 0.0)
    kernel = np.asarray(net.layer_kernel[...])
    assert abs(kernel.std() - 0.02) < 0.001 and abs(kernel.mean()) < 0.001
    mixer = np.asarray(SparseMasks(4096, 2, False, eps=1e-5, rngs=nnx.Rngs(1)).reward.mixer[...])
    assert abs(mixer.std() - 0.02) < 0.001 and abs(mixer.mean()) < 0.001

    n_layers, width = 4, 64
    net = SparseMasks(n_layers, width, False, eps=1e-5, rngs=nnx.Rngs(2))
    hs = np.random.default_rng(3).normal(size=(n_layers, 64, 2, 8, width)).astype(np.float32)
    m, _ = net(jnp.asarray(hs), None, 0.0)
    m = np.asarray(m)
    scale = 0.02**2 * np.sqrt(width * n_layers / 2)  # std of the mixer's input sum
    assert m.min() == 0.0 and 0.2 < np.mean(m == 0) < 0.8  # ReLU: many exactly 0
    assert 0.1 * scale < m[m > 0].mean() < 3 * scale  # ~ 0.005 here: far from 1


def test_dropout_drops_and_rescales():
    net = SparseMasks(2, 8, False, eps=1e-5, rngs=nnx.Rngs(0))
    net.reward.mixer[...] = jnp.ones(2)  # all masks > 0 below
    net.reward.layer_bias[...] = jnp.full(2, 3.0)
    hs = jnp.asarray(np.random.default_rng(0).normal(size=(2, 4000, 8)), jnp.float32)
    clean, _ = net(hs, None, 0.3)  # no rng: no dropout
    dropped, _ = net(hs, jax.random.key(0), 0.3)
    assert np.all(np.asarray(clean) > 0)
    # m = 0 where the mixer's dropout hits (0.3) or both layer scores' do (0.7 · 0.3²)
    assert 0.33 < np.mean(np.asarray(dropped) == 0) < 0.40
    np.testing.assert_allclose(np.mean(dropped), np.mean(clean), rtol=0.05)


def sparse_setup(independent: bool):
    mesh = one_device_mesh()
    graph, policy, ref, _ = models(mesh)
    make = lambda: SparseMasks(
        TINY.num_layers, TINY.hidden_size, independent, eps=TINY.norm_eps, rngs=nnx.Rngs(5)
    )
    mgraph, mparams, _ = st.create_params(make, mesh)
    loss = loss_config("sparse_masks")
    loss.l1_mask_u = loss.l1_mask_d = 1e-3
    spec = make_spec(graph, mlc.FrozenConfigDict(loss))
    spec = dataclasses.replace(spec, graphs=(("policy", graph), ("mask_net", mgraph)))
    return spec, {"policy": policy, "mask_net": mparams}, ref


def test_masks_read_every_reference_layer_at_the_prediction_slots():
    """mask_u = net(reference hidden_states[1:] at each completion token's predecessor),
    the gather here done outside the layer loop with NumPy."""
    spec, params, ref = sparse_setup(independent=True)
    batch = random_batch()
    inputs = jax.jit(lambda p, r, b: train_inputs.token_inputs(p, r, b, None, spec)[0])(
        params, ref, batch
    )
    model = nnx.merge(spec.ref_graph, ref)
    g, k, t = batch["tokens"].shape
    rows = lambda x: jnp.asarray(x).reshape(g * k, t)
    full = model.hidden(
        rows(batch["tokens"]),
        rows(batch["positions"]),
        rows(batch["segment_ids"]),
        all_layers=True,
    )
    full = np.asarray(full).reshape(TINY.num_layers + 1, g, k * t, -1)
    idx = batch["pred_index"].reshape(g, -1)
    at_slots = full[:, np.arange(g)[:, None], idx]
    at_slots = at_slots.reshape(TINY.num_layers + 1, -1, *batch["pred_index"].shape[2:], 32)
    net = nnx.merge(spec.graph("mask_net"), params["mask_net"])
    m_u, m_d = net(jnp.asarray(at_slots[1:]), None, 0.0)
    np.testing.assert_allclose(inputs.mask_u, m_u, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(inputs.mask_d, m_d, rtol=1e-5, atol=1e-7)
    skip_last, _ = net(jnp.asarray(at_slots[:-1]), None, 0.0)  # embeddings, not the last
    assert not np.allclose(inputs.mask_u, skip_last)


@pytest.mark.parametrize("independent", [False, True])
def test_gradient_reaches_the_mask_net_and_not_the_reference(independent):
    spec, params, ref = sparse_setup(independent)
    batch = random_batch()

    def loss(params, ref):
        norms = sp.normalizers(batch, spec, params, ref)
        return sp.loss_fn(params, ref, batch, jax.random.key(0), spec=spec, norms=norms)[0]

    g_params, g_ref = jax.jit(jax.grad(loss, argnums=(0, 1)))(params, ref)
    for leaf in jax.tree.leaves(g_ref):
        np.testing.assert_array_equal(leaf, 0.0)
    assert all(np.abs(x).sum() > 0 for x in jax.tree.leaves(g_params["policy"]))
    nets = ("reward", "kl") if independent else ("reward",)
    assert set(g_params["mask_net"]) == set(nets)
    for name in nets:
        g = g_params["mask_net"][name]
        for leaf in jax.tree.leaves(g):
            assert np.all(np.isfinite(leaf))
        for key in ("layer_kernel", "layer_bias", "mixer"):  # (a layer's may be 0: ReLUs)
            assert np.abs(np.asarray(g[key])).sum() > 0, (name, key)


def test_shared_prompt_packing_gives_the_padded_masks():
    """Every layer gathered at the slots of packed rows (blocked attention within a span)
    gives each completion token the mask it gets in a padded batch."""
    from mipo_jax.data.embedded import load_tokenizer
    from mipo_jax.data.encoding import tokenize_records
    from mipo_jax.data.iterator import PreferenceIterator
    from mipo_jax.data.packing import Layout, unit_lengths
    from mipo_jax.data.tasks import sentiment
    from mipo_jax.models import CausalLM
    from mipo_jax.train import step_batch

    records = sentiment.generate("controlled", 12, seed=3)
    tok = load_tokenizer("toy_words")
    data = tokenize_records(records, tok)
    cfg = dataclasses.replace(TINY, vocab_size=max(len(tok), 16), attention_block=8)
    mesh = one_device_mesh()
    graph, ref, _ = st.create_params(lambda: CausalLM(cfg, rngs=nnx.Rngs(1)), mesh)
    spec, params, _ = sparse_setup(independent=False)
    params["policy"] = ref
    net = params["mask_net"]["reward"]  # a mixer > 0: masks > 0 wherever a layer score is
    net["mixer"] = jnp.abs(net["mixer"]) + 0.01
    spec = dataclasses.replace(spec, ref_graph=graph, graphs=(("policy", graph), spec.graphs[1]))
    it = PreferenceIterator(
        data, Layout(kind="shared_prompt", rows=2, row_length=48), seed=0, process_index=0,
        process_count=1,
    )  # fmt: skip
    packed = next(it)
    ids = packed.pop("example_id").ravel()
    packed.pop("ref_logps", None)
    rows = [int(np.nonzero(data.example_id == e)[0][0]) for e in ids if e >= 0]
    padded = step_batch.padded_examples(data, rows, max_length=24, max_completion=8)
    span = int(unit_lengths(data, "shared_prompt").max())
    inputs = lambda spec, b: jax.jit(lambda p, r: train_inputs.token_inputs(p, r, b, None, spec)[0])
    a = inputs(dataclasses.replace(spec, attention_span=span), packed)(params, ref)
    b = inputs(spec, padded)(params, ref)
    a_pairs = [i for i, e in enumerate(ids) if e >= 0]
    assert len(a_pairs) == len(rows) > 2
    for i, j in zip(a_pairs, range(len(rows)), strict=True):
        for side in (0, 1):
            got = np.asarray(a.mask_u[i, side])[np.asarray(a.mask[i, side]) > 0]
            want = np.asarray(b.mask_u[j, side])[np.asarray(b.mask[j, side]) > 0]
            assert got.size == want.size > 0 and np.mean(want > 0) > 0.5
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * want.max())
