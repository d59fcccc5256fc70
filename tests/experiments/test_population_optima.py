"""experiments/population_optima: the quick run recovers every closed form it measures."""

import json

from experiments.population_optima import run


def test_quick_run_recovers_gibbs_policies_and_blahut_arimoto(tmp_path):
    path = run.main(["--quick", "--out", str(tmp_path), "--runs", str(tmp_path / "runs")])
    r = json.loads(open(path).read())
    worst = r["worst"]
    # population minimisers = Gibbs policies (full run: ≤ 4e-7), minimum = Bayes risk
    assert worst["dpo_max_abs"] < 1e-5 and worst["midpo_fixed_max_abs"] < 1e-5
    assert worst["dpo_loss_minus_bayes_risk"] < 1e-10
    assert worst["midpo_fixed_loss_minus_bayes_risk"] < 1e-10
    # Blahut–Arimoto through the loss = closed-form Blahut–Arimoto, step for step
    assert worst["ba_loss_same_steps_max_abs_zeta"] < 1e-6
    assert worst["ba_loss_max_abs_pi"] < 1e-5  # and its fixed point at these α
    assert worst["ba_rate_minus_mi"] < 1e-12
    # the alternation's points lie on the reward–information curve, DPO's below it
    for seed in r["per_seed"]:
        for row in seed["rows"]:
            a = row["alpha"]
            ba = row["ba_loss_reward"] - a * row["ba_loss_mi"]
            dpo = row["dpo_reward"] - a * row["dpo_mi"]
            assert ba > dpo + 1e-3
    assert (tmp_path / "population_optima.png").stat().st_size < 300_000
