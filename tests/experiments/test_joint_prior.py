"""experiments/joint_prior: every prior reaches the same loss minimum (the Bayes risk); only
the mutual-information objective ranks them, and only Blahut–Arimoto or the learned prior with
the MI term reach its optimum. The LM part of the quick run is a smoke test of its trainer path."""

import json
import math

import pytest

from experiments.joint_prior import run


@pytest.mark.slow
def test_quick_run_same_loss_minimum_different_mi_objective(tmp_path):
    path = run.main(["--quick", "--out", str(tmp_path), "--runs", str(tmp_path / "runs")])
    r = json.loads(open(path).read())
    rows = r["bandit_rows"]
    for row in rows:
        assert abs(row["loss_gap"]) < 1e-6  # all at the Bayes risk: no "better minimum"
    for seed in {row["seed"] for row in rows}:
        by = {row["method"]: row for row in rows if row["seed"] == seed}
        assert by["ba"]["dist_ba"] < 1e-5
        assert by["learned_mi"]["dist_ba"] < 1e-3  # joint descent with the MI term → BA point
        assert by["learned"]["dist_ba"] > 1e-2  # without it: elsewhere on the manifold
        best_mi = by["ba"]["mi_objective"]
        for key in ("dpo", "uniform", "learned"):
            assert by[key]["mi_objective"] < best_mi - 1e-3
            assert by[key]["kl_objective"] <= by["dpo"]["kl_objective"] + 1e-9
    (lm_run,) = r["lm_runs"]
    assert lm_run["method"] == "dpo" and math.isfinite(lm_run["reward"])
