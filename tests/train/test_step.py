"""The train step on a tiny model: accumulation, NaN guard, sharding, inputs, schedule."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np
import optax
import pytest
from flax import nnx

from mipo_jax.losses import loss_config, required_inputs
from mipo_jax.models import CausalLM, ModelConfig
from mipo_jax.sharding import make_mesh
from mipo_jax.train import optim, step_batch
from mipo_jax.train import state as st
from mipo_jax.train import step as sp

TINY = ModelConfig(
    family="llama",
    vocab_size=48,
    hidden_size=32,
    intermediate_size=64,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=8,
    tie_embeddings=True,
)


@pytest.fixture(autouse=True)
def fast_compile():
    old = jax.config.values["jax_disable_most_optimizations"]
    jax.config.update("jax_disable_most_optimizations", True)
    yield
    jax.config.update("jax_disable_most_optimizations", old)


def one_device_mesh():
    return make_mesh((1, 1, 1), devices=jax.devices()[:1])


def models(mesh, seed_policy=0, seed_ref=1):
    make = lambda s: lambda: CausalLM(TINY, rngs=nnx.Rngs(s))
    graph, policy, shardings = st.create_params(make(seed_policy), mesh)
    _, ref, _ = st.create_params(make(seed_ref), mesh)
    return graph, policy, ref, shardings


def random_batch(n=8, seed=0, t=12, c=6):
    rng = np.random.default_rng(seed)
    seqs = lambda lo, hi: [list(rng.integers(1, 48, rng.integers(lo, hi))) for _ in range(n)]
    return step_batch.padded_pairs(
        seqs(2, 5), seqs(1, 6), seqs(1, 6), max_length=t, max_completion=c
    )


def make_spec(graph, loss, accum=1, lr=1e-3):
    opt = mlc.ConfigDict(
        dict(name="adamw", learning_rate=lr, warmup_steps=0, schedule="constant", clip_norm=1.0)
    )
    tx, sched = optim.make_optimizer(opt, 10)
    fields = required_inputs(loss)
    return sp.StepSpec(
        graphs=(("policy", graph),),
        ref_graph=graph,
        loss=loss,
        tx=tx,
        lr=sched,
        fields=fields,
        grad_accum=accum,
    )


def frozen(loss):
    return mlc.FrozenConfigDict(loss)


@pytest.mark.parametrize("prior", ["reference", "sequential_kl"])
def test_grad_accumulation_equals_one_large_batch(prior):
    mesh = one_device_mesh()
    graph, policy, ref, _ = models(mesh)
    loss = loss_config(prior)
    loss.sft_weight = 0.5  # exercises the token-count normalizer too
    batch = random_batch()
    batch["pair_valid"][3] = 0.0  # a padding pair must count nowhere
    results = []
    for accum in (1, 4):
        spec = make_spec(graph, frozen(loss), accum)
        fn = jax.jit(lambda p, b, r, spec=spec: sp._grads(p, r, b, jax.random.key(0), spec))
        results.append(fn({"policy": policy}, batch, ref))
    (l1, g1, m1), (l4, g4, m4) = results
    np.testing.assert_allclose(l1, l4, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g4), strict=True):
        # equal up to float32 summation order: relative to the tensor's largest entry
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * float(np.abs(b).max()))
    assert set(m1) == set(m4)
    for k in m1:
        np.testing.assert_allclose(m1[k].value, m4[k].value, rtol=1e-5, atol=1e-6, err_msg=k)
    assert float(m1["rewards/accuracies"].count) == 7.0  # 8 pairs, one padding


def test_nonfinite_step_is_skipped_and_counted():
    mesh = one_device_mesh()
    graph, policy, ref, _ = models(mesh)
    spec = make_spec(graph, frozen(loss_config("reference")))
    state = st.init_state({"policy": policy}, spec.tx, 0)
    step = jax.jit(functools.partial(sp.train_step, spec=spec))
    good = random_batch()
    state, m = step(state, good, ref)
    assert int(state.nonfinite) == 0 and int(state.skipped) == 0
    before = jax.device_get(state.params)
    bad_ref = jax.tree.map(lambda x: x * jnp.nan, ref)  # a NaN reference makes the loss NaN
    for i in range(2):
        state, m = step(state, good, bad_ref)
        assert int(state.nonfinite) == i + 1 and int(state.skipped) == i + 1
        assert not np.isfinite(float(m["loss"].value))
    after = jax.device_get(state.params)
    for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after), strict=True):
        np.testing.assert_array_equal(a, b)
    state, m = step(state, good, ref)
    assert int(state.nonfinite) == 0 and int(state.skipped) == 2 and int(state.step) == 4


def test_update_to_nonfinite_parameters_is_skipped():
    mesh = one_device_mesh()
    graph, policy, ref, _ = models(mesh)
    spec = make_spec(graph, frozen(loss_config("reference")), lr=float("inf"))
    state = st.init_state({"policy": policy}, spec.tx, 0)
    before = jax.device_get(state.params)
    step = jax.jit(functools.partial(sp.train_step, spec=spec))
    state, m = step(state, random_batch(), ref)
    # loss and gradient are finite (they are computed before the update); the result is not
    assert np.isfinite(float(m["loss"].value)) and np.isfinite(float(m["grad_norm"].value))
    assert int(state.nonfinite) == 1 and int(state.skipped) == 1 and int(state.step) == 1
    for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(jax.device_get(state.params))):
        np.testing.assert_array_equal(a, b)
    assert bool(sp.all_finite(state.opt_state))


def test_sharded_step_equals_unsharded():
    loss = frozen(loss_config("reference"))
    batch = random_batch()
    outs = []
    for sizes, devices in (((1, 1, 1), jax.devices()[:1]), ((2, 2, 2), jax.devices()[:8])):
        mesh = make_mesh(sizes, devices=devices)
        graph, policy, ref, shardings = models(mesh)
        # plain SGD: the update is linear in the gradient (Adam's first step is ±lr·sign(g),
        # which turns float noise on near-zero gradients into whole-step differences)
        spec = dataclasses.replace(make_spec(graph, loss), tx=optax.sgd(1.0))
        state = st.init_state({"policy": policy}, spec.tx, 0)
        s_sh = st.state_shardings(state, spec.tx, {"policy": shardings}, mesh)
        b_sh = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(("data", "fsdp")))
        with jax.set_mesh(mesh):
            step = jax.jit(
                functools.partial(sp.train_step, spec=spec),
                in_shardings=(s_sh, b_sh, shardings),
                out_shardings=(s_sh, st.replicated(mesh)),
                donate_argnums=0,
            )
            state = jax.device_put(state, s_sh)
            new, metrics = step(state, jax.device_put(batch, b_sh), ref)
        if sizes == (2, 2, 2):
            kernel = new.params["policy"]["layers"]["mlp"]["up"]["kernel"]
            assert len(kernel.sharding.device_set) == 8
        outs.append((jax.device_get(new.params), {k: float(v.value) for k, v in metrics.items()}))
    (p1, m1), (p8, m8) = outs
    for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p8), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    for k in m1:
        np.testing.assert_allclose(m1[k], m8[k], rtol=1e-5, atol=1e-6, err_msg=k)


def test_step_zero_is_log2_when_policy_is_reference():
    mesh = one_device_mesh()
    graph, policy, _, _ = models(mesh)
    spec = make_spec(graph, frozen(loss_config("reference")))
    state = st.init_state({"policy": policy}, spec.tx, 0)
    _, m = jax.jit(functools.partial(sp.train_step, spec=spec))(state, random_batch(), policy)
    np.testing.assert_allclose(float(m["loss"].value), np.log(2.0), rtol=1e-6)
    assert abs(float(m["rewards/margins"].value)) < 1e-5


@pytest.mark.parametrize("kind", ["cosine", "linear", "constant"])
def test_schedule_warms_up_then_decays(kind):
    opt = mlc.ConfigDict(dict(learning_rate=1.0, warmup_steps=10, schedule=kind, end_factor=0.1))
    lr = optim.schedule(opt, 110)
    assert float(lr(0)) == 0.0 and float(lr(5)) == pytest.approx(0.5)
    assert float(lr(10)) == pytest.approx(1.0)
    end = {"cosine": 0.1, "linear": 0.1, "constant": 1.0}[kind]
    assert float(lr(110)) == pytest.approx(end, abs=1e-6)


def test_rmsprop_matches_torch_defaults():
    opt = mlc.ConfigDict(dict(name="rmsprop", learning_rate=0.1, warmup_steps=0))
    tx, _ = optim.make_optimizer(opt, 10)
    p = {"w": jnp.array([1.0, -2.0])}
    g = {"w": jnp.array([0.5, 0.25])}
    updates, _ = tx.update(g, tx.init(p), p)
    # torch: v = 0.01 g², p -= lr · g / (sqrt(v) + eps)  ->  step of lr / 0.1 = 1.0 in size
    expected = -0.1 * g["w"] / (np.sqrt(0.01) * np.abs(g["w"]))
    np.testing.assert_allclose(updates["w"], expected, rtol=1e-5)


@pytest.mark.parametrize("kind", ["pairs", "shared_prompt"])
def test_packed_layouts_give_the_padded_metrics(kind):
    from mipo_jax.data.embedded import load_tokenizer
    from mipo_jax.data.encoding import tokenize_records
    from mipo_jax.data.iterator import PreferenceIterator
    from mipo_jax.data.packing import Layout, unit_lengths
    from mipo_jax.data.tasks import sentiment

    records = sentiment.generate("controlled", 12, seed=3)
    tok = load_tokenizer("toy_words")
    data = tokenize_records(records, tok)
    # attention blocks of 8 tokens that read keys only within the longest unit: rows of 48
    # hold several units, so blocks and span both cut work the mask would discard anyway
    cfg = TINY.__class__(**{**TINY.__dict__, "vocab_size": max(len(tok), 16), "attention_block": 8})
    mesh = one_device_mesh()
    make = lambda s: lambda: CausalLM(cfg, rngs=nnx.Rngs(s))
    graph, policy, _ = st.create_params(make(0), mesh)
    _, ref, _ = st.create_params(make(1), mesh)
    span = int(unit_lengths(data, kind).max())
    assert span < 48
    spec = make_spec(graph, frozen(loss_config("reference")))
    packed_spec = dataclasses.replace(spec, attention_span=span)
    it = PreferenceIterator(
        data, Layout(kind=kind, rows=2, row_length=48), seed=0, process_index=0, process_count=1
    )
    packed = next(it)
    ids = packed.pop("example_id")
    packed.pop("ref_logps", None)
    rows = [int(np.nonzero(data.example_id == e)[0][0]) for e in ids.ravel() if e >= 0]
    padded = step_batch.padded_examples(data, rows, max_length=24, max_completion=8)
    ev = lambda spec: jax.jit(functools.partial(sp.eval_step, spec=spec))
    a = ev(packed_spec)({"policy": policy}, packed, ref)
    b = ev(spec)({"policy": policy}, padded, ref)
    assert float(a["rewards/accuracies"].count) == len(rows) > 2
    for k in a:
        np.testing.assert_allclose(a[k].value, b[k].value, rtol=1e-5, atol=1e-5, err_msg=k)


def test_step_data_batch_has_configured_groups():
    """A packed step batch holds exactly ``data.groups`` groups (the iterator's batch)."""
    from configs import default
    from mipo_jax.train.data import StepData

    config = default.get_config()
    config.data.layout, config.data.groups = "pairs", 3
    data = StepData(config, "train")
    batch = next(data)
    assert all(v.shape[0] == 3 for v in batch.values()), {k: v.shape for k, v in batch.items()}


def test_step_data_attention_span_bounds_every_batch():
    """Packed: the span the step may rely on is the longest unit, and a batch that reached
    further back (a packing bug) would stop the run instead of silently losing keys."""
    from configs import default
    from mipo_jax.data.packing import unit_lengths
    from mipo_jax.models.masks import attention_span
    from mipo_jax.train.data import StepData

    config = default.get_config()
    config.data.layout = "shared_prompt"
    data = StepData(config, "train")
    assert data.attention_span == int(unit_lengths(data.data, "shared_prompt").max())
    batch = next(data)
    reach = attention_span(batch["segment_ids"], batch["attend_to"])
    assert 0 < reach <= data.attention_span < config.data.row_length
    data.__dict__["attention_span"] = reach - 1  # pretend a shorter promise
    with pytest.raises(RuntimeError, match="attends .* tokens back"):
        next(data)
    config.data.layout = "padded"
    assert StepData(config, "train").attention_span is None


def kto_batch(n=8, seed=0):
    """A padded unpaired batch with TRL's mismatched KL rows (controlled-task words)."""
    from mipo_jax.data.embedded import load_tokenizer
    from mipo_jax.data.encoding import tokenize_records
    from mipo_jax.data.packing import assemble_padded
    from mipo_jax.data.tasks import sentiment

    rng = np.random.default_rng(seed)
    words = lambda k: " ".join(sentiment.WORDS[i] for i in rng.integers(0, 8, k))
    rows = [
        {"prompt": words(int(rng.integers(2, 5))) + " :", "completion": " " + words(4 - i % 3),
         "label": bool(i % 3)}
        for i in range(n)
    ]  # fmt: skip
    data = tokenize_records(rows, load_tokenizer("toy_words"), kind="unpaired")
    return assemble_padded(data, np.arange(n), n, 16, 8)


@pytest.mark.parametrize("loss_type", ["kto", "apo_zero_unpaired"])
def test_kto_grad_accumulation_equals_one_large_batch(loss_type):
    """z_0 is the whole batch's estimate under accumulation, so loss, gradients and metrics
    (z_0 included, as ``kl``) equal one large batch; per-micro-batch z_0 would not."""
    from mipo_jax.losses.kto import kto_config

    mesh = one_device_mesh()
    graph, policy, ref, _ = models(mesh)
    cfg = kto_config()
    cfg.loss_type = loss_type
    cfg.beta = 1.0  # larger than TRL's 0.1 so that a wrong z_0 shows in the loss clearly
    batch = kto_batch()
    batch["pair_valid"][5] = 0.0  # a padding slot counts nowhere (and micro-batches differ)
    results = []
    for accum in (1, 4):
        spec = dataclasses.replace(
            make_spec(graph, frozen(loss_config("reference")), accum),
            loss=frozen(cfg), fields=frozenset(), objective="unpaired",
        )  # fmt: skip
        fn = jax.jit(lambda p, b, r, spec=spec: sp._grads(p, r, b, jax.random.key(0), spec))
        results.append(fn({"policy": policy}, batch, ref))
    (l1, g1, m1), (l4, g4, m4) = results
    if loss_type == "kto":
        assert float(m1["kl"].value) > 0.01  # z_0 is not clamped to 0: the test can see it
    else:  # APO-zero reads no z_0 and, as TRL, does not run the mismatched rows
        assert float(m1["kl"].value) == float(m4["kl"].value) == 0.0
    np.testing.assert_allclose(l1, l4, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g4), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * float(np.abs(b).max()))
    assert set(m1) == set(m4)
    # z_0 (``kl``) is a mean of differences of summed log-probs of about -72: the forward
    # passes over micro-batches of another shape round those sums differently by up to an
    # ulp (7.6e-6 at 72), which z_0 ~ 0.3 inherits. (Per-micro-batch z_0s, as in TRL,
    # measured 7.8, 0, 0, 0 on this batch: far outside this tolerance.)
    ulp = float(np.spacing(np.float32(abs(m1["logps/chosen"].value))))
    for k in m1:
        atol = 4 * ulp if k == "kl" else 1e-6
        np.testing.assert_allclose(m1[k].value, m4[k].value, rtol=1e-5, atol=atol, err_msg=k)
    np.testing.assert_allclose(float(m4["loss"].value), float(l1), rtol=1e-5)
    assert float(m1["rewards/chosen"].count) + float(m1["rewards/rejected"].count) == 7.0


def test_logits_metrics_are_trls_mean_logit_over_completion_tokens():
    """TRL logs ``logits/chosen`` = logits[chosen completion tokens].mean() (over tokens and
    the vocabulary); the step gets it from h · mean_v(W) without [..., V] logits."""
    mesh = one_device_mesh()
    graph, policy, ref, _ = models(mesh)
    spec = make_spec(graph, frozen(loss_config("reference")))
    batch = random_batch()
    m = jax.jit(functools.partial(sp.eval_step, spec=spec))({"policy": policy}, batch, ref)
    model = nnx.merge(graph, policy)
    for side, name in enumerate(("chosen", "rejected")):
        logits = np.asarray(
            model(
                jnp.asarray(batch["tokens"][:, side]),
                jnp.asarray(batch["positions"][:, side]),
                jnp.asarray(batch["segment_ids"][:, side]),
            ),
            np.float64,
        )
        t = batch["tokens"].shape[-1]
        pred = batch["pred_index"][:, 0, side] - side * t  # positions within the row
        mask = batch["mask"][:, 0, side] > 0
        picked = np.take_along_axis(logits, pred[..., None], axis=1)[mask]  # [tokens, V]
        np.testing.assert_allclose(float(m[f"logits/{name}"].value), picked.mean(), rtol=1e-5)
