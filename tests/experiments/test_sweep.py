"""The sweep helper: grid expansion, overrides applied, finished runs reused, clashes refused."""

import json

import pytest

import mipo_jax
from experiments import sweep


def fake_train(calls):
    def train(config, workdir):
        calls.append((float(config.loss.alpha), int(config.seed)))
        summary = {"eval_after": {"true/reward": config.loss.alpha * 10 + config.seed}}
        with open(f"{workdir}/summary.json", "w") as f:
            json.dump(summary, f)
        return summary

    return train


def test_grid_runs_each_once_and_resumes(tmp_path):
    base = lambda: mipo_jax.get_config("dpo", tiny=True)
    overrides = sweep.grid(**{"loss.alpha": [0.1, 0.5], "seed": [0, 1]})
    assert len(overrides) == 4 and overrides[1] == {"loss.alpha": 0.1, "seed": 1}
    calls = []
    first = sweep.run_grid(base, overrides, str(tmp_path), train=fake_train(calls), log=str)
    assert sorted(calls) == [(0.1, 0), (0.1, 1), (0.5, 0), (0.5, 1)]
    assert [r["reused"] for r in first] == [False] * 4
    assert first[3]["config"]["loss"]["alpha"] == 0.5 and first[3]["name"] == "alpha=0.5_seed=1"
    again = sweep.run_grid(base, overrides, str(tmp_path), train=fake_train(calls), log=str)
    assert len(calls) == 4 and all(r["reused"] for r in again)  # nothing trained twice
    assert sweep.lookup(again[2], "eval_after.true/reward") == pytest.approx(5.0)
    md = sweep.table(again, ["loss.alpha", "seed", "eval_after.true/reward"])
    assert md.splitlines()[2] == "| 0.1 | 0 | 1 |"


def test_unknown_key_and_clashing_workdir_are_refused(tmp_path):
    base = lambda: mipo_jax.get_config("dpo", tiny=True)
    with pytest.raises(KeyError, match="loss.betaa"):
        sweep.apply(base(), {"loss.betaa": 1.0})
    sweep.run_grid(base, [{"seed": 1}], str(tmp_path), train=fake_train([]), log=str)
    (tmp_path / "seed=1" / sweep.OVERRIDES_FILE).write_text('{"seed": 2}')
    with pytest.raises(ValueError, match="other overrides"):
        sweep.run_grid(base, [{"seed": 1}], str(tmp_path), train=fake_train([]), log=str)


def test_a_stopped_run_stops_the_sweep(tmp_path):
    """SIGTERM makes the trainer return a ``stopped`` summary; the sweep must not go on."""
    base = lambda: mipo_jax.get_config("dpo", tiny=True)
    calls = []

    def train(config, workdir):
        calls.append(int(config.seed))
        if config.seed == 1:
            return {"stopped": "preempted", "step": 3}
        return fake_train([])(config, workdir)

    with pytest.raises(sweep.Stopped, match="seed=1: stopped"):
        sweep.run_grid(base, sweep.grid(seed=[0, 1, 2]), str(tmp_path), train=train, log=str)
    assert calls == [0, 1]  # seed 2 never started
