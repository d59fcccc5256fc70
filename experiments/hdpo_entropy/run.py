"""H-DPO's entropy control (Omura et al. 2024, arXiv 2411.07595) on the arithmetic task.

  python -m experiments.hdpo_entropy.run [--quick] [--seeds N] [--out DIR]

Trains H-DPO (``configs/hdpo.py``, β = 0.1) for a ∈ {0.5, 0.7, 0.9, 1.0, 1.2} from one SFT
model on ``embedded:arithmetic`` (`experiments.lm_common`); a = 1 is DPO. The trainer's exact
evaluation (`mipo_jax.train.task_eval.ArithmeticEval`) gives, on held-out problems, the
entropy of the answer distribution, P(correct), pass@k (k = 1, 4, 16) and the greedy
accuracy over the finite candidate set −99…198 (renormalised). The closed-form H-DPO optimum
π*_a ∝ π_ref^{1/a}·exp(r/(aβ)) (mathematics §3.4) is evaluated for the reward DPO learned
(``tempered_dpo``): it is DPO's policy at temperature a, π_DPO^{1/a}, exactly. Writes
``results.json`` and ``entropy.png`` to DIR (default: this folder) and prints the table.
"""

from __future__ import annotations

import os
import pathlib
import time

import numpy as np

from experiments import lm_common as L

HERE = pathlib.Path(__file__).resolve().parent
TASK = "arithmetic"
FULL = dict(a=(0.5, 0.7, 0.9, 1.0, 1.2), steps=60, seeds=3, prompts=16, sft_steps=2000)
QUICK = dict(a=(0.5, 1.0), steps=30, seeds=1, prompts=16, sft_steps=150)
BETA = 0.1
METRICS = ("entropy", "p_correct", "pass@1", "pass@4", "pass@16", "greedy", "kl_ref")


def tempered(logp: np.ndarray, a: float) -> np.ndarray:
    """Rows of ``logp`` at temperature ``a``: log of π^{1/a} renormalised."""
    z = logp / a
    return z - np.logaddexp.reduce(z, axis=-1, keepdims=True)


def hdpo_optimum(ref: np.ndarray, reward: np.ndarray, a: float, beta: float) -> np.ndarray:
    """The H-DPO optimum log π*_a ∝ (1/a)·log π_ref + r/(aβ), rows renormalised (§3.4)."""
    return tempered(ref + reward / beta, a)


def main() -> None:
    args, p, seeds, out, work, sft, start = L.start(
        __doc__, HERE, "hdpo_entropy", TASK, QUICK, FULL
    )

    def base():
        config = L.base_config("hdpo", TASK, p["steps"], sft, "live", a=1.0)
        config.hdpo_beta = BETA
        config.train.task_eval_prompts = p["prompts"]
        config.export.hf = True  # the a = 1 (DPO) policies are scored again below
        return config

    grid = L.seeds_overrides([{"loss.prior.temperature": a} for a in p["a"]], seeds)
    runs = L.sweep_runs(base, grid, os.path.join(work, "hdpo"), args.finished_only)
    rows = []
    for a in p["a"]:
        mine = [x for x in runs if x["overrides"]["loss.prior.temperature"] == a]
        if not mine:
            continue
        vals = {m: [x["summary"]["eval_after"][f"true/{m}"] for x in mine] for m in METRICS}
        rows.append(dict(a=a, **{m: L.mean_std(v) for m, v in vals.items()}, runs=vals))

    # closed forms: the SFT reference, its tempering ζ = π_ref^{1/a}, and DPO tempered by a
    from mipo_jax.data.embedded import load_tokenizer
    from mipo_jax.train.task_eval import ArithmeticEval, answer_metrics

    ev = ArithmeticEval(load_tokenizer("toy_chars"), p["prompts"])
    config = base()
    ref = L.score_folder(sft, config, ev)
    dpo = [
        L.score_folder(x["summary"]["export"], config, ev)
        for x in runs
        if x["overrides"]["loss.prior.temperature"] == 1.0
    ]
    closed = []
    for a in p["a"]:
        entry = {"a": a, "tempered_reference": answer_metrics(tempered(ref, a), ev.correct)}
        if dpo:
            per_seed = [answer_metrics(tempered(d, a), ev.correct) for d in dpo]
            entry["tempered_dpo"] = {
                m: L.mean_std([s[m] for s in per_seed]) for m in per_seed[0] if m != "kl_ref"
            }
        closed.append(entry)
    keys = [f"true/{m}" for m in METRICS] + ["loss", "rewards/accuracies"]
    result = dict(
        claim="H-DPO's a < 1 lowers the entropy of the policy (sharper, more mode-seeking), "
        "a > 1 raises it; the paper reports better pass@1/accuracy for a slightly below 1 "
        "(Omura et al. 2024, arXiv 2411.07595)",
        setup=dict(
            task=f"embedded:{TASK}",
            model=L.MODEL,
            quick=args.quick,
            beta=BETA,
            reference="live (the SFT model)",
            **{**p, "seeds": seeds},
        ),  # fmt: skip
        sft_reference=answer_metrics(ref, ev.correct),
        eval_prompts=ev.prompts,
        rows=rows,
        closed_form=closed,
        runs=[L.run_record(x, keys) for x in runs],
        seconds=round(time.time() - start, 1),
    )
    L.write_json(os.path.join(out, "results.json"), result)
    plot(result, os.path.join(out, "entropy.png"))
    print(table(result))
    print(f"total {result['seconds']:.0f} s")


def table(result: dict) -> str:
    cols = ("entropy", "p_correct", "pass@1", "pass@4", "pass@16", "greedy")
    lines = ["| a | " + " | ".join(cols) + " | KL(π‖π_ref) |", "|---" * (len(cols) + 2) + "|"]
    for x in result["rows"]:
        cells = [L.fmt(*x[c]) for c in (*cols, "kl_ref")]
        lines.append(f"| {x['a']:g} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    a = [x["a"] for x in result["rows"]]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.8), dpi=110)
    m, s = np.array([x["entropy"] for x in result["rows"]]).T
    ax1.errorbar(a, m, yerr=s, fmt="o-", capsize=3, label="H-DPO, trained")
    c = result["closed_form"]
    ac = [x["a"] for x in c]
    if "tempered_dpo" in c[0]:
        ax1.plot(ac, [x["tempered_dpo"]["entropy"][0] for x in c], "k--",
                 label="closed form: π_DPO^{1/a}")  # fmt: skip
    ax1.plot(ac, [x["tempered_reference"]["entropy"] for x in c], ":", c="gray",
             label="prior ζ = π_ref^{1/a}")  # fmt: skip
    ax1.set_xlabel("a")
    ax1.set_ylabel("entropy of the answer (nats)")
    ax1.legend(fontsize=7)
    ax1.grid(alpha=0.3)
    for k, col in zip((1, 4, 16), ("C0", "C1", "C2")):
        m, s = np.array([x[f"pass@{k}"] for x in result["rows"]]).T
        ax2.errorbar(a, m, yerr=s, fmt="o-", c=col, capsize=3, label=f"pass@{k}")
        if "tempered_dpo" in c[0]:
            ax2.plot(ac, [x["tempered_dpo"][f"pass@{k}"][0] for x in c], "--", c=col, lw=1)
    ax2.set_xlabel("a")
    ax2.set_ylabel("pass@k (exact, candidate set)")
    ax2.set_title("dashed: closed form π_DPO^{1/a}", fontsize=8)
    ax2.legend(fontsize=7)
    ax2.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


if __name__ == "__main__":
    main()
