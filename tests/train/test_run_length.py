"""How long a run is, and data that does not fit the objective: checked before compiling."""

import json
import logging

import jax
import pytest

import mipo_jax
from mipo_jax.train import optim, setup, stages

ROWS = [
    {"prompt": "bad awful fun :", "chosen": " good great", "rejected": " bad awful"},
    {"prompt": "dull fun :", "chosen": " lovely good", "rejected": " boring dull"},
    {"prompt": "great bad :", "chosen": " fun fun", "rejected": " awful awful"},
]


@pytest.fixture(autouse=True)
def fast_compile(tmp_path, monkeypatch):
    monkeypatch.setenv("MIPO_JAX_CACHE", str(tmp_path / "cache"))
    old = jax.config.values["jax_disable_most_optimizations"]
    jax.config.update("jax_disable_most_optimizations", True)
    yield
    jax.config.update("jax_disable_most_optimizations", old)


def write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def tiny(tmp_path, n_rows=12, **train):
    config = mipo_jax.get_config("dpo", tiny=True)
    config.mesh.data = 1
    config.data.source = write(tmp_path / "pairs.jsonl", (ROWS * n_rows)[:n_rows])
    config.data.tokenizer = "toy_words"
    config.train.eval_batches = 0
    config.train.update(train)
    return config


def test_dpo_on_unpaired_rows_is_refused_before_compiling(tmp_path):
    config = tiny(tmp_path)
    unpaired = [{"prompt": r["prompt"], "completion": r["chosen"], "label": True} for r in ROWS]
    config.data.source = write(tmp_path / "kto.jsonl", unpaired)
    with pytest.raises(ValueError, match="unpaired rows .* use configs/kto.py"):
        setup.build(config, str(tmp_path / "run"))


def test_data_epochs_cap_the_run_and_it_finishes_cleanly(tmp_path, caplog):
    config = tiny(tmp_path, num_steps=10)  # 12 rows, batch 4: 3 steps per epoch
    config.data.num_epochs = 1
    config.export.update(dict(plot=False, hf=True))
    with caplog.at_level(logging.WARNING, logger="mipo_jax"):
        summary = stages.run(config, str(tmp_path / "run"))
    assert "data.num_epochs=1 holds 3 steps" in caplog.text
    assert summary["steps"] == 3 and summary["export"]
    assert (tmp_path / "run" / "checkpoints" / "3").is_dir()


def test_train_num_epochs_is_trls_num_train_epochs(tmp_path):
    config = tiny(tmp_path, num_epochs=2)  # 2 × 3 steps
    config.export.hf = False
    summary = stages.run(config, str(tmp_path / "run"))
    rows = [json.loads(x) for x in open(tmp_path / "run" / "metrics.jsonl")]
    assert summary["steps"] == 6 and [r["step"] for r in rows if r["split"] == "train"] == [
        1, 2, 3, 4, 5, 6,
    ]  # fmt: skip
    assert summary["data"]["train"]["kept"] == 12


def test_warmup_longer_than_the_run_warns_and_warmup_ratio_scales(caplog):
    config = mipo_jax.get_config("dpo")
    with caplog.at_level(logging.WARNING, logger="mipo_jax"):
        optim.schedule(config.optim, 100)  # 150 warm-up steps
    assert "never reaches its peak" in caplog.text
    config.optim.warmup_ratio = 0.1
    assert optim.warmup_steps(config.optim, 100) == 10
    lr = optim.schedule(config.optim, 100)
    assert float(lr(10)) == pytest.approx(config.optim.learning_rate)
