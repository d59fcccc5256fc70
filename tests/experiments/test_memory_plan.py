"""experiments/bench/memory_plan.py at its smallest size (tiny model, 8 simulated devices), its
step against the trainer's, and the LoRA estimate against closed forms."""

import json
import subprocess
import sys

import jax
import numpy as np
import pytest

from experiments.bench import memory_plan as plan
from tests import multiprocess_worker as w

TINY = "llama3_1b:tiny"


@pytest.mark.slow
def test_script_at_its_smallest_size(tmp_path):
    out = tmp_path / "plan.json"
    cmd = [sys.executable, "-m", "experiments.bench.memory_plan", "--models", TINY,
           "--sizes", "8", "--meshes", "1,8,1", "--variants", "live/none", "cached/full",
           "--unit", "MiB", "--json", str(out)]  # fmt: skip
    proc = subprocess.run(
        cmd, cwd=w.REPO, env=w.subprocess_env(1), capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.read_text())
    assert [(r["reference"], r["remat"]) for r in rows] == [("live", "none"), ("cached", "full")]
    for r in rows:
        # XLA's per-device arguments are exactly the shards of the abstract inputs, and the
        # donated state is aliased to the new state in full
        assert r["argument"] == r["expected_argument"] > 0
        assert r["alias"] == r["state_bytes"] and r["output"] >= r["state_bytes"]
        assert r["temp"] > 0 and r["total"] == r["argument"] + r["output"] + r["temp"] - r["alias"]
    live, cached = rows
    assert live["reference_bytes"] > 0 and cached["reference_bytes"] == 0
    assert cached["batch_bytes"] > live["batch_bytes"]  # the reference log-probs ride along
    table = [line for line in proc.stdout.splitlines() if line.startswith(f"| {TINY} |")]
    assert len(table) == 1 + 2 + 1  # summary row, two cases, one LoRA row
    assert "**total** (MiB)" in proc.stdout


def test_step_is_the_trainers(tmp_path, monkeypatch):
    """The plan's abstract state and batch equal what `mipo_jax.train.setup.build` builds for
    the same config and mesh: shapes, dtypes and shardings (update `plan.lower_step` when
    this fails after a change to the trainer)."""
    from mipo_jax.train.setup import build
    from mipo_jax.train.state import abstract

    monkeypatch.setenv("MIPO_JAX_CACHE", str(tmp_path / "cache"))
    case = plan.Case(TINY, (1, 8, 1), "live", "full")
    config = plan.load_config(case)
    with config.unlocked():
        config.model.vocab_size = 0
        config.train.eval_batches = 0
    run, run_state = build(config, str(tmp_path / "run"))
    mesh = run.mesh
    batch = plan.host_batch(plan.load_config(case), with_ref_logps=False)
    _, (state, plan_batch, ref) = plan.lower_step(plan.load_config(case), mesh, batch)
    trainer = abstract(run_state, run.state_shardings)

    def same(a, b):
        assert (a.shape, a.dtype) == (b.shape, b.dtype)
        assert a.sharding.is_equivalent_to(b.sharding, len(a.shape)), (a.sharding, b.sharding)

    assert jax.tree.structure(state) == jax.tree.structure(trainer)
    jax.tree.map(same, state, trainer)
    jax.tree.map(same, ref, abstract(run.reference, run.policy.shardings))
    real = {k: v for k, v in next(run.source).items() if k not in ("example_id", "ref_logps")}
    assert {k: (v.shape, v.dtype) for k, v in plan_batch.items()} == {
        k: (np.shape(v), np.asarray(v).dtype) for k, v in real.items()
    }


def test_lora_estimate_closed_forms():
    """Adapter count: L·r·Σ(in + out) over q, k, v, o, gate, up, down; on one device the
    state is 2 bytes per base parameter plus 16 per adapter parameter; on 8, between an
    eighth of that and all of it (small tensors are replicated)."""
    config = plan.load_config(plan.Case(TINY, (1, 1, 1), "live", "none"))
    with config.unlocked():
        config.model.vocab_size = 512
    cfg = plan.model_config(config)
    d, f, hd = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    q, kv, r = cfg.num_heads * hd, cfg.num_kv_heads * hd, 8
    want = cfg.num_layers * r * ((d + q) + 2 * (d + kv) + (q + d) + 2 * (d + f) + (f + d))
    from mipo_jax.sharding import make_mesh

    one = make_mesh((1, 1, 1), devices=jax.devices()[:1])
    got = plan.lora_estimate(cfg, one, r)
    assert got["adapter_params"] == want
    assert got["state_bytes"] == 2 * got["base_params"] + 16 * want
    eight = plan.lora_estimate(cfg, make_mesh((1, 8, 1)), r)
    assert eight["adapter_params"] == want
    assert got["state_bytes"] / 8 <= eight["state_bytes"] < got["state_bytes"]
    layer = d * q + 2 * d * kv + q * d + 3 * d * f + 2 * d  # attention, MLP, two norms
    head = 0 if cfg.tie_embeddings else d * cfg.vocab_size
    assert got["base_params"] == cfg.vocab_size * d + cfg.num_layers * layer + d + head
