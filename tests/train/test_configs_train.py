"""Every ``configs/*.py`` trains for 2 steps at ``:tiny`` through the real loop."""

import importlib
import json
import math
import pathlib

import jax
import pytest

from mipo_jax.train.loop import train

CONFIG_DIR = pathlib.Path(__file__).resolve().parents[2] / "configs"
NAMES = sorted(p.stem for p in CONFIG_DIR.glob("*.py") if p.stem not in ("__init__", "common"))


@pytest.fixture(autouse=True)
def fast_compile():
    old = jax.config.values["jax_disable_most_optimizations"]
    jax.config.update("jax_disable_most_optimizations", True)
    yield
    jax.config.update("jax_disable_most_optimizations", old)


def tiny(name: str):
    config = importlib.import_module(f"configs.{name}").get_config("tiny")
    config.mesh.data = 1  # one device: the sharded path has its own tests
    config.train.eval_batches = 0
    config.export.plot = False
    return config


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    """Derived files (TIS-DPO contrastive models, reference caches) in this test's tmp dir."""
    monkeypatch.setenv("MIPO_JAX_CACHE", str(tmp_path / "cache"))


@pytest.mark.parametrize("name", NAMES)
def test_config_trains_two_steps_at_tiny(name, tmp_path):
    config = tiny(name)
    summary = train(config, str(tmp_path))
    assert summary["steps"] == 2 and summary["skipped_steps"] == 0
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    train_rows = [r for r in rows if r["split"] == "train"]
    assert [r["step"] for r in train_rows] == [1, 2]
    for r in train_rows:
        assert math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]), r
        assert r["num_tokens"] > 0
    assert (tmp_path / "checkpoints" / "2").is_dir()
