"""hdpo_entropy: the closed-form H-DPO optimum and the exact arithmetic metrics against float64
brute force, the arithmetic evaluator's candidate set, and the quick run."""

import itertools
import json
import subprocess
import sys

import numpy as np
import pytest
from scipy import optimize

from experiments.hdpo_entropy import run as R
from mipo_jax.data.embedded import load_tokenizer
from mipo_jax.data.tasks import arithmetic
from mipo_jax.train.task_eval import ArithmeticEval, answer_metrics


def _table(seed=0, k=5):
    rng = np.random.default_rng(seed)
    z = rng.normal(size=k)
    return z - np.logaddexp.reduce(z), rng.normal(size=k)


@pytest.mark.parametrize("a", [0.5, 0.7, 1.0, 1.2])
def test_hdpo_optimum_maximises_the_hdpo_objective(a):
    """π*_a maximises E_π r − β(−a H(π) + CE(π, π_ref)) (mathematics §2.3), by BFGS."""
    ref, r = _table()
    beta = 0.3

    def neg_objective(theta):
        lp = theta - np.logaddexp.reduce(theta)
        p = np.exp(lp)
        return -(p @ r - beta * (a * (p @ lp) - p @ ref))

    res = optimize.minimize(neg_objective, np.zeros_like(ref), method="BFGS", tol=1e-12)
    brute = res.x - np.logaddexp.reduce(res.x)
    ours = R.hdpo_optimum(ref, r, a, beta)
    assert np.max(np.abs(np.exp(ours) - np.exp(brute))) < 1e-4
    assert -neg_objective(ours) >= -res.fun - 1e-12  # no better point than the closed form


def test_hdpo_optimum_for_dpos_reward_is_dpo_tempered():
    """With DPO's implicit reward r̂ = β log π_DPO/π_ref, π*_a = π_DPO^{1/a} (normalised)."""
    ref, _ = _table(1)
    dpo, _ = _table(2)
    beta = 0.1
    for a in (0.5, 0.9, 1.2):
        implied = beta * (dpo - ref)
        np.testing.assert_allclose(
            R.hdpo_optimum(ref, implied, a, beta), R.tempered(dpo, a), atol=1e-12
        )


def test_entropy_of_the_optimum_grows_with_a():
    ref, r = _table(3, k=9)
    ents = []
    for a in np.linspace(0.3, 2.0, 30):
        lp = R.hdpo_optimum(ref, r, a, 0.5)
        ents.append(-np.exp(lp) @ lp)
    assert np.all(np.diff(ents) > 0)


def test_answer_metrics_against_enumeration():
    """pass@k by enumerating all k-draws, entropy by its definition, in float64."""
    rng = np.random.default_rng(4)
    z = rng.normal(size=(3, 4))
    lp = z - np.logaddexp.reduce(z, axis=1, keepdims=True)
    correct = np.zeros((3, 4), bool)
    correct[[0, 1, 2], [2, 0, 3]] = True
    ref = np.log(np.full((3, 4), 0.25))
    m = answer_metrics(lp, correct, ref)
    p = np.exp(lp)
    for k in (1, 4):  # pass@16 below from the same formula checked at k = 1, 4
        brute = []
        for i in range(3):
            total = 0.0
            for draw in itertools.product(range(4), repeat=k):
                if any(correct[i, j] for j in draw):
                    total += np.prod([p[i, j] for j in draw])
            brute.append(total)
        assert m[f"pass@{k}"] == pytest.approx(np.mean(brute), abs=1e-12)
    assert m["p_correct"] == pytest.approx(m["pass@1"], abs=1e-15)
    ent = np.mean([-sum(p[i, j] * np.log(p[i, j]) for j in range(4)) for i in range(3)])
    assert m["entropy"] == pytest.approx(ent, abs=1e-12)
    assert m["kl_ref"] == pytest.approx(np.log(4) - ent, abs=1e-12)
    greedy = np.mean([correct[i, np.argmax(p[i])] for i in range(3)])
    assert m["greedy"] == pytest.approx(greedy)


def test_arithmetic_eval_candidates():
    ev = ArithmeticEval(load_tokenizer("toy_chars"), 6)
    assert len(ev.prompts) == 6 and ev.correct.shape == (6, 298)
    assert np.all(ev.correct.sum(axis=1) == 1)  # every answer is a candidate, once
    for prompt, row in zip(ev.prompts, ev.correct):
        ans = ArithmeticEval.CANDIDATES[int(np.argmax(row))]
        assert arithmetic.check(prompt, str(ans))
    # a uniform scorer gives the uniform distribution: entropy log 298
    lp = ev.logprobs(lambda b: np.zeros((b["tokens"].shape[0], 1)))
    assert ev.metrics(lp)["entropy"] == pytest.approx(np.log(298), abs=1e-9)


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("hdpo")
    subprocess.run(
        [sys.executable, "-m", "experiments.hdpo_entropy.run", "--quick",
         "--out", str(out), "--workdir", str(out / "work")],
        check=True,
    )  # fmt: skip
    return json.loads((out / "results.json").read_text())


@pytest.mark.slow
def test_quick_run_shows_the_entropy_ordering(quick):
    rows = {x["a"]: x for x in quick["rows"]}
    assert rows[0.5]["entropy"][0] < rows[1.0]["entropy"][0]
