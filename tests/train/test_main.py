"""The command and the loop: CLI, resume (bitwise, other mesh), NaN stop, reference cache."""

import json
import os
import re
import subprocess
import sys

import jax
import numpy as np
import pytest

from configs import default, dpo, tdpo
from mipo_jax.checkpoint import Checkpointer, PreemptionGuard
from mipo_jax.train import checks, loop, setup
from mipo_jax.train import state as st
from mipo_jax.train.refcache import ReferenceCache, weights_hash

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(autouse=True)
def fast_compile():
    old = jax.config.values["jax_disable_most_optimizations"]
    jax.config.update("jax_disable_most_optimizations", True)
    yield
    jax.config.update("jax_disable_most_optimizations", old)


def tiny(module=dpo, steps=4, mesh=(1, 1, 1), **train):
    config = module.get_config("tiny")
    config.mesh.data, config.mesh.fsdp, config.mesh.tensor = mesh
    config.train.num_steps = steps
    config.train.eval_batches = 0
    config.export.plot = False
    config.optim.learning_rate = 1e-2  # visible updates in 4 steps
    config.train.update(train)
    return config


def final_params(workdir):
    run, state = setup.build(tiny(), workdir)  # shapes and shardings; values from the ckpt
    restored = Checkpointer(os.path.join(workdir, "checkpoints"), save_every=1)
    with restored as ckpt:
        r = ckpt.restore_or_none(st.abstract(state, run.state_shardings))
    return r.step, jax.device_get(r.state)


def stop_at(monkeypatch, step):
    monkeypatch.setattr(PreemptionGuard, "should_stop", lambda self, s: s == step)


def test_cli_runs_and_validates_first(tmp_path):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "", "PYTHONPATH": ROOT}
    cmd = [sys.executable, "-m", "mipo_jax.main", "--config=configs/dpo.py:tiny"]
    bad = subprocess.run(
        cmd + [f"--workdir={tmp_path}/bad", "--config.reference.mode=nope"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert bad.returncode != 0
    assert "reference.mode='nope' is not allowed; choose one of: live, cached" in bad.stderr
    assert not os.path.exists(tmp_path / "bad" / "checkpoints")  # nothing heavy happened
    ok = subprocess.run(
        cmd + [f"--workdir={tmp_path}/ok", "--config.train.num_steps=3", "--config.mesh.data=1"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert ok.returncode == 0, ok.stderr[-3000:]
    summary = json.load(open(tmp_path / "ok" / "summary.json"))
    assert summary["steps"] == 3 and summary["reference"]["source"].startswith("random")
    assert (tmp_path / "ok" / "curves.png").exists()
    assert os.listdir(tmp_path / "ok" / "tensorboard")
    lines = open(tmp_path / "ok" / "metrics.jsonl").read().splitlines()
    assert [json.loads(x)["step"] for x in lines if '"train"' in x] == [1, 2, 3]
    help_ = subprocess.run(
        [sys.executable, "-m", "mipo_jax.main", "--help"], cwd=ROOT, env=env,
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert "--config" in help_.stdout and "--workdir" in help_.stdout


def test_interrupted_run_resumes_bitwise(tmp_path, monkeypatch):
    whole = str(tmp_path / "whole")
    loop.train(tiny(), whole)
    parts = str(tmp_path / "parts")
    stop_at(monkeypatch, 2)  # as SIGTERM at step 2: save, exit cleanly
    assert loop.train(tiny(), parts) == {"stopped": "preempted", "step": 2}
    monkeypatch.undo()
    loop.train(tiny(), parts)  # resumes from step 2
    (s1, a), (s2, b) = final_params(whole), final_params(parts)
    assert s1 == s2 == 4
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(x, y)
    rows = lambda w: [json.loads(x) for x in open(os.path.join(w, "metrics.jsonl"))]
    losses = lambda w: {r["step"]: r["loss"] for r in rows(w) if r["split"] == "train"}
    assert losses(whole) == losses(parts)


def test_checkpoint_moves_to_another_mesh(tmp_path, monkeypatch):
    ref = str(tmp_path / "ref")
    loop.train(tiny(), ref)
    moved = str(tmp_path / "moved")
    stop_at(monkeypatch, 2)
    loop.train(tiny(mesh=(2, 2, 2)), moved)  # 8 devices: data 2 x fsdp 2 x tensor 2
    monkeypatch.undo()
    loop.train(tiny(mesh=(1, 1, 1)), moved)  # resumed on 1 device
    (_, a), (_, b) = final_params(ref), final_params(moved)
    for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params), strict=True):
        np.testing.assert_allclose(x, y, rtol=0, atol=5e-4)  # Adam, lr 1e-2: ~5 % of a step


def test_nonfinite_steps_stop_the_run(tmp_path):
    config = tiny(max_nonfinite=2, num_steps=8)
    # warm-up: step 1 has rate 0; step 2's update gives parameters ~1e30 (finite, ruined),
    # so step 3's gradient is NaN and every step after it is skipped
    config.optim.learning_rate = 1e30
    config.checkpoint.every = 1
    with pytest.raises(loop.NonFiniteError) as err:
        loop.train(config, str(tmp_path))
    message = str(err.value)
    assert "2 non-finite steps in a row" in message and "steps 3-4" in message
    assert f"The last checkpoint is step 2 ({tmp_path}/checkpoints/2)" in message
    largest = re.search(r"largest \|parameter\| now ([0-9.e+]+)\)", message)
    assert largest and float(largest.group(1)) > 1e29  # what the user needs to see
    # no checkpoint of a skipped step: its counter would come back on resume
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["1", "2"]
    step, state = final_params(str(tmp_path))
    assert step == 2 and int(state.nonfinite) == 0
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(state.params))
    config.checkpoint.every = 4  # no checkpoint before the non-finite steps
    with pytest.raises(loop.NonFiniteError, match="No checkpoint was saved before them"):
        loop.train(config, str(tmp_path / "none"))
    assert not os.listdir(tmp_path / "none" / "checkpoints")


def test_cached_reference_equals_live_and_hits(tmp_path, caplog):
    caplog.set_level("INFO", logger="mipo_jax")
    live = loop.train(tiny(steps=2), str(tmp_path / "live"))
    config = tiny(steps=2)
    config.reference.mode = "cached"
    config.reference.cache_dir = str(tmp_path / "cache")
    cached = loop.train(config, str(tmp_path / "cached"))
    assert "reference cache miss" in caplog.text
    rows = lambda w: [json.loads(x) for x in open(tmp_path / w / "metrics.jsonl")]
    assert len(rows("live")) == 2
    for a, b in zip(rows("live"), rows("cached"), strict=True):
        np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-5)
    assert live["reference"]["mode"] == "live" and "cached" in cached["reference"]["source"]
    caplog.clear()
    loop.train(config, str(tmp_path / "again"))
    assert "reference cache hit" in caplog.text and "miss" not in caplog.text


def test_reference_cache_key_changes_with_data_and_reference(tmp_path):
    from mipo_jax.data import data_config
    from mipo_jax.train.data import StepData

    config = dpo.get_config("tiny")
    run, state = setup.build(tiny(), str(tmp_path / "w"))
    data = run.source.data
    params = state.params["policy"]
    w = weights_hash(params, repr(run.policy.config))
    calls = []

    def score(batch):
        calls.append(1)
        return np.zeros(batch["targets"].shape[:1] + batch["targets"].shape[2:], np.float32)

    def cache(weights, d, width=8):
        return ReferenceCache(str(tmp_path / "c"), weights, d, width)

    c1 = cache(w, data).load_or_build(score, batch_size=512, max_length=64)
    assert not c1.hit and calls
    calls.clear()
    assert cache(w, data).load_or_build(score, batch_size=512, max_length=64).hit and not calls
    other_w = weights_hash(jax.tree.map(lambda x: x + 1e-3, params))
    assert cache(other_w, data).key != c1.key  # another reference misses
    config.data = data_config(source="embedded:length_biased", max_length=64)
    config.data.groups = 1
    other_data = StepData(config, "train").data
    assert cache(w, other_data).key != c1.key  # other data misses
    config.data.max_completion_length = 3
    config.data.bad_input = "skip"
    truncated = StepData(config, "train").data
    assert cache(w, truncated).key != cache(w, other_data).key  # other tokenisation misses


def test_default_config_validates_and_tdpo_refuses_cache():
    default.get_config()  # the demo's config
    config = tdpo.get_config("tiny")
    config.reference.mode = "cached"
    with pytest.raises(ValueError, match="only reference.mode='live' gives"):
        checks.validate(config)
