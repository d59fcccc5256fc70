"""LoRA training (``model.lora``): only adapters are trained, optimised and checkpointed; the
base stays frozen, is the reference and is never copied; runs resume bitwise; evaluation and
export see the adapted model; sharded equals unsharded; abstract builds for memory plans."""

import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import dice, dpo, kto, mipo_learned
from mipo_jax.hf.export import save_pretrained
from mipo_jax.hf.load import load_pretrained
from mipo_jax.models import lora
from mipo_jax.train import adapters, loop, setup
from mipo_jax.train import state as st
from mipo_jax.train.data import to_device
from mipo_jax.train.evaluation import values
from tests.train.baseline import VOLATILE
from tests.train.test_main import stop_at

LN2 = math.log(2.0)


@pytest.fixture(autouse=True)
def fast_compile():
    old = jax.config.values["jax_disable_most_optimizations"]
    jax.config.update("jax_disable_most_optimizations", True)
    yield
    jax.config.update("jax_disable_most_optimizations", old)


def tiny(module=dpo, steps=4, mesh=(1, 1, 1), rank=4, **lora_kw):
    config = module.get_config("tiny")
    config.mesh.data, config.mesh.fsdp, config.mesh.tensor = mesh
    config.train.num_steps = steps
    config.train.eval_batches = 0
    config.export.plot = False
    config.optim.learning_rate = 1e-2
    config.model.lora.update(dict(rank=rank, **lora_kw))
    return config


def step(run, state, i):
    host = run.source.next(i, state)
    for transform in run.transforms:
        host = transform(host, state, i)
    state, metrics = run.step_fn(state, to_device(host, run.batch_sharding), run.reference)
    return state, values(metrics)


def numel(tree) -> int:
    return sum(math.prod(x.shape) for x in jax.tree.leaves(tree) if x.ndim)


def names(tree) -> set:
    return {str(path[-1].key) for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]}


def test_only_adapters_train_and_the_base_stays(tmp_path):
    run, state = setup.build(tiny(), str(tmp_path / "a"))
    assert names(state.params["policy"]) == {"lora_a", "lora_b"}
    assert run.spec.ref_graph is not None  # the live reference is the base itself:
    base = jax.device_get(run.reference)  # the same arrays the policy adds its adapters to
    for x, y in zip(jax.tree.leaves(run.reference), jax.tree.leaves(run.lora.base.params)):
        assert x is y
    state, first = step(run, state, 0)
    assert abs(first["loss"] - LN2) < 1e-6  # B = 0: the policy starts equal to its reference
    for i in range(1, 3):
        state, _ = step(run, state, i)
    for x, y in zip(jax.tree.leaves(run.reference), jax.tree.leaves(base), strict=True):
        np.testing.assert_array_equal(np.asarray(x), y)  # unchanged, and never donated
    b = state.params["policy"]["layers"]["attn"]["q"]["lora_b"]
    assert float(jnp.abs(b).max()) > 1e-3  # the adapters did train
    policy = nnx.merge(run.policy.graph, run.policy_params(state))
    assert lora.is_adapted(policy)


def test_optimiser_state_is_proportional_to_the_adapters(tmp_path):
    """AdamW holds two moments per trained parameter: 2·(adapter size), which is r·c."""
    sizes = {}
    for rank in (0, 2, 4):
        config = tiny(rank=rank)
        config.optim.name = "adamw"
        run, state = setup.build(config, str(tmp_path / str(rank)))
        sizes[rank] = (numel(state.params["policy"]), numel(state.opt_state))
    (base, full_opt), (a2, opt2), (a4, opt4) = sizes[0], sizes[2], sizes[4]
    assert full_opt == 2 * base  # full fine-tune: two moments of every weight
    assert opt2 == 2 * a2 and opt4 == 2 * a4 and a4 == 2 * a2
    # the closed form: r·L·Σ(in + out) over q, k, v, o, gate, up, down (tiny: D 32, F 64)
    c = tiny().model
    d, q, kv, f = (
        c.hidden_size,
        c.num_heads * c.head_dim,
        c.num_kv_heads * c.head_dim,
        c.intermediate_size,
    )
    per_layer = 2 * (d + q) + 2 * (d + kv) + 3 * (d + f)  # q and o, k and v, gate up down
    assert a2 == 2 * c.num_layers * per_layer
    assert a4 < base / 4  # width 32: r = 4 is already a fifth (SmolLM2, r = 8: 1.8 %)


@pytest.mark.slow
def test_run_resumes_bitwise_and_exports_the_adapted_model(tmp_path, monkeypatch):
    def config():
        c = tiny(dropout=0.1)  # dropout keys too must continue exactly
        c.train.update(dict(eval_batches=1, eval_every=2, task_eval_prompts=2))
        return c

    whole, parts = str(tmp_path / "whole"), str(tmp_path / "parts")
    summary = loop.train(config(), whole)
    stop_at(monkeypatch, 2)
    assert loop.train(config(), parts) == {"stopped": "preempted", "step": 2}
    monkeypatch.undo()
    loop.train(config(), parts)
    rows = lambda w: [
        {k: v for k, v in json.loads(x).items() if k not in VOLATILE}
        for x in open(os.path.join(w, "metrics.jsonl"))
    ]
    assert rows(whole) == rows(parts)  # train and eval rows, exact task metrics included
    before = summary["eval_before"]
    assert abs(before["loss"] - LN2) < 1e-6 and before["rewards/margins"] == 0.0
    assert any(k.startswith("true/") for k in before)  # the exact task metrics ran
    run, state = setup.build(config(), str(tmp_path / "shapes"))
    with_ckpt = lambda w: final_params_of(run, state, w)
    (s1, a), (s2, b) = with_ckpt(whole), with_ckpt(parts)
    assert s1 == s2 == 4
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(x, y)
    assert names(a.params["policy"]) == {"lora_a", "lora_b"}  # checkpoints hold adapters
    # the export the loop writes: the adapted model, merged (float32, 1e-5 relative)
    trained = jax.device_put(a, run.state_shardings)
    model = nnx.merge(run.policy.graph, run.policy_params(trained))
    save_pretrained(model, tmp_path / "export")
    reloaded = load_pretrained(tmp_path / "export")
    tokens = (np.arange(40).reshape(2, 20) * 5 + 1) % model.config.vocab_size
    want, got = np.asarray(model(tokens)), np.asarray(reloaded(tokens))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def final_params_of(run, state, workdir):
    from mipo_jax.checkpoint import Checkpointer

    with Checkpointer(os.path.join(workdir, "checkpoints"), save_every=1) as ckpt:
        r = ckpt.restore_or_none(st.abstract(state, run.state_shardings))
    return r.step, jax.device_get(r.state)


def test_sharded_step_equals_one_device(tmp_path):
    one, s1 = setup.build(tiny(), str(tmp_path / "one"))
    eight, s8 = setup.build(tiny(mesh=(2, 2, 2)), str(tmp_path / "eight"))
    spec = eight.state_shardings.params["policy"]["layers"]["attn"]["q"]["lora_a"].spec
    assert spec[1] == "fsdp"  # A [L, embed, r]: the embed axis sharded as the kernel's
    for x, y in zip(jax.tree.leaves(s1.params), jax.tree.leaves(s8.params), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    (s1, m1), (s8, m8) = step(one, s1, 0), step(eight, s8, 0)
    (s1, m1), (s8, m8) = step(one, s1, 1), step(eight, s8, 1)
    assert m1["loss"] == pytest.approx(m8["loss"], rel=1e-5)
    for x, y in zip(jax.tree.leaves(s1.params), jax.tree.leaves(s8.params), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=0, atol=5e-4)


@pytest.mark.parametrize("module", [kto, mipo_learned], ids=["kto", "mipo_learned"])
def test_other_objectives_and_policy_samples(module, tmp_path):
    """KTO (z_0 from the policy over mismatched rows) and the learnable prior (policy samples
    in a batch transform) run on the adapted policy."""
    run, state = setup.build(tiny(module), str(tmp_path))
    assert names(state.params["policy"]) == {"lora_a", "lora_b"}
    state, metrics = step(run, state, 0)
    assert np.isfinite(metrics["loss"]) and metrics["skipped"] == 0


def test_lora_refuses_moving_references_and_bad_keys(tmp_path):
    with pytest.raises(ValueError, match="DICE/SPIN rounds .* set model.lora.rank=0"):
        setup.build(tiny(dice), str(tmp_path / "a"))
    with pytest.raises(ValueError, match=r"model.lora.alpha=0.0 must be > 0"):
        setup.build(tiny(alpha=0.0), str(tmp_path / "b"))
    with pytest.raises(ValueError, match=r"model.lora.targets='q,x'"):
        setup.build(tiny(targets="q,x"), str(tmp_path / "c"))


def test_abstract_lora_step_for_memory_plans():
    """Nothing materialised: the LoRA step lowers and compiles from abstract inputs, and its
    state argument is the adapters' (plus moments) while the base is a separate argument."""
    import ml_collections as mlc

    from mipo_jax.train import modules, needs, optim
    from mipo_jax.train.step import StepSpec, train_step
    from mipo_jax.train.step_batch import padded_pairs

    config = tiny(rank=8)
    mesh = setup.mesh_of(config)
    cfg = modules.random_config(config.model, _Vocab(256))
    graph, abstract = nnx.split(nnx.eval_shape(lambda: modules.CausalLM(cfg, rngs=nnx.Rngs(0))))
    p_sh = st.param_shardings(abstract, mesh)
    base = modules.Built(graph, st.abstract(nnx.to_pure_dict(abstract), p_sh), p_sh, "", cfg)
    p = adapters.build(base, config.model, mesh, 0, abstract=True)
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(p.adapters))
    tx, lr = optim.make_optimizer(config.optim, 10)
    spec = StepSpec(graphs=(("policy", p.graph),), ref_graph=graph, tx=tx, lr=lr,
                    loss=mlc.FrozenConfigDict(config.loss), fields=needs.loss_fields(config),
                    lora=p.adapted)  # fmt: skip
    state = jax.eval_shape(lambda a: st.init_state({"policy": a}, tx, 0), p.adapters)
    shardings = st.state_shardings(state, tx, {"policy": p.shardings}, mesh)
    batch = padded_pairs([[5, 6, 7]] * 2, [[8, 9]] * 2, [[10]] * 2, max_length=32,
                         max_completion=8)  # fmt: skip
    fn = jax.jit(lambda s, b, r: train_step(s, b, r, spec=spec), donate_argnums=0)
    lowered = fn.lower(st.abstract(state, shardings), batch, base.params)
    memory = lowered.compile().memory_analysis()
    state_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state))
    base_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(base.params))
    assert memory.argument_size_in_bytes >= state_bytes + base_bytes
    n = lora.count(p.adapters)  # the state: adapters and their moments (RMSprop: one)
    assert numel(state.params) == n and numel(state.opt_state) == n


class _Vocab:
    bos_token_id, eos_token_id, pad_token_id = 1, 2, 0

    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n


@pytest.mark.slow
def test_smollm2_lora_run(tmp_path):
    """``configs/smollm2.py:lora`` trains two steps on SmolLM2-135M (float32 compute): the
    adapters start at B = 0, so the first loss is ln 2 (the policy equals its reference, the
    base), and the checkpoint holds 2.44 M adapter parameters and their moments, not the
    134.5 M base weights (538 MB in float32)."""
    from configs import smollm2

    config = smollm2.get_config("lora")
    config.mesh.data = 1
    config.batch_size = 2
    config.model.compute_dtype = "float32"
    config.train.update(dict(num_steps=2, eval_batches=0, progress=False))
    config.data.update(dict(max_length=128, max_completion_length=32, completion_width=32))
    config.export.update(dict(hf=False, plot=False))
    workdir = str(tmp_path / "run")
    summary = loop.train(config, workdir)
    assert summary["steps"] == 2 and summary["skipped_steps"] == 0
    assert summary["reference"]["source"].startswith("gguf:")
    rows = [json.loads(x) for x in open(os.path.join(workdir, "metrics.jsonl"))]
    losses = [r["loss"] for r in rows if r["split"] == "train"]
    assert abs(losses[0] - LN2) < 1e-6 and np.isfinite(losses[1])
    size = sum(
        os.path.getsize(os.path.join(d, f))
        for d, _, files in os.walk(os.path.join(workdir, "checkpoints"))
        for f in files
    )
    assert size < 64 * 2**20  # adapters + AdamW moments: 3 × 2.44 M float32 = 29 MB at most
