"""DPO's reward–KL frontier (Rafailov et al. 2023, Fig. 2 left) on the controlled task, exactly.

  python -m experiments.reward_kl_frontier.run [--quick] [--seeds N] [--out DIR]

Sweeps the regularisation strength of DPO, IPO, H-DPO (a = 0.9), SimPO and the learnable
prior (MI-DPO with ζ_φ and the MI term) on ``embedded:controlled``; every run trains the
same SFT model (`experiments.lm_common`) against the task's exact π_ref (the data's
``ref_*_logps`` columns, ``reference.mode='dataset'``). The trainer's exact evaluation gives
E_π[r] and KL(π ‖ π_ref) over the finite completion set of held-out prompts; the exact
frontier is that of π*_β ∝ π_ref·exp(r/β) on the same prompts (`frontier`). Writes
``results.json`` and ``frontier.png`` to DIR (default: this folder) and prints the table.
"""

from __future__ import annotations

import os
import pathlib
import time

import numpy as np

from experiments import lm_common as L

HERE = pathlib.Path(__file__).resolve().parent
TASK = "controlled"
A_HDPO = 0.9
# label: (config, config args, swept key, full values, quick values); larger = closer to π_ref
ALGOS = {
    "DPO": ("dpo", {}, "loss.alpha", (0.5, 1.0, 2.0, 3.0, 5.0, 10.0), (0.5, 5.0)),
    "IPO": ("ipo", {}, "loss.alpha", (0.25, 0.5, 1.0, 2.0, 4.0, 8.0), ()),
    f"H-DPO (a={A_HDPO})": (
        "hdpo",
        {"a": A_HDPO},
        "hdpo_beta",
        (0.5, 1.0, 2.0, 3.0, 5.0, 10.0),
        (),
    ),
    "SimPO": ("simpo", {}, "loss.alpha", (0.25, 0.5, 1.0, 2.0, 4.0, 8.0), (1.0,)),
    "MI-DPO learned ζ": ("mipo_learned", {}, "loss.alpha", (0.5, 1.0, 2.0, 3.0, 5.0, 10.0), ()),
}
FULL = dict(steps=60, seeds=3, prompts=2, sft_steps=300)
QUICK = dict(steps=30, seeds=1, prompts=2, sft_steps=100)


def task_tables(prompts: int):
    """(log π_ref, r) ``[prompts, completions]`` of the prompts the trainer evaluates."""
    from mipo_jax.data.embedded import load_tokenizer
    from mipo_jax.train.task_eval import TaskEval

    ev = TaskEval(f"embedded:{TASK}", load_tokenizer("toy_words"), prompts)
    return ev.task_ref, ev.reward


def frontier(ref: np.ndarray, r: np.ndarray, betas) -> dict[str, np.ndarray]:
    """Exact (mean KL(π*_β‖π_ref), mean E_{π*_β}[r]) over prompts for each β (float64).

    π*_β(y|x) ∝ π_ref(y|x)·exp(r(x,y)/β) maximises E[r] − β·KL for every prompt, so for a
    shared β it also maximises the prompt-mean E[r] at its prompt-mean KL: the curve is the
    exact frontier max{E[r] : KL ≤ k}.
    """
    from mipo_jax.data.tasks import sentiment

    kl, reward = [], []
    for b in betas:
        ms = [
            sentiment.exact_metrics(sentiment.optimal_logprobs(ref[i], r[i], b), ref[i], r[i])
            for i in range(len(ref))
        ]
        kl.append(np.mean([m["kl"] for m in ms]))
        reward.append(np.mean([m["reward"] for m in ms]))
    return {"beta": np.asarray(betas, float), "kl": np.array(kl), "reward": np.array(reward)}


def frontier_reward_at(front: dict, kl: float, r_max: float) -> float:
    """max{E_π[r] : KL(π‖π_ref) ≤ kl}: interpolated on the curve, ``r_max`` past its end."""
    order = np.argsort(front["kl"])
    ks, rs = front["kl"][order], front["reward"][order]
    if kl >= ks[-1]:
        return float(r_max) if kl > ks[-1] + 1e-9 else float(rs[-1])
    return float(np.interp(kl, ks, rs))


def frontier_kl_for(front: dict, reward: float) -> float:
    """min{KL(π‖π_ref) : E_π[r] ≥ reward}: the frontier's KL at that reward (its last KL for a
    reward at or beyond the curve's end)."""
    order = np.argsort(front["kl"])
    ks, rs = front["kl"][order], front["reward"][order]
    return float(np.interp(reward, rs, ks))


def optimum_point(ref: np.ndarray, r: np.ndarray, config: str, value: float) -> dict | None:
    """(mean KL, mean E[r]) of the population optimum a run aims at, where closed-form:
    DPO π*_β ∝ π_ref·e^{r/β}; H-DPO π*_a ∝ (π_ref·e^{r/β})^{1/a} (mathematics §2.3)."""
    from mipo_jax.data.tasks import sentiment

    if config not in ("dpo", "hdpo"):
        return None
    a = A_HDPO if config == "hdpo" else 1.0
    kl, reward = [], []
    for i in range(len(ref)):
        z = (ref[i] + r[i] / value) / a
        lp = z - np.logaddexp.reduce(z)
        m = sentiment.exact_metrics(lp, ref[i], r[i])
        kl.append(m["kl"])
        reward.append(m["reward"])
    return {"kl": float(np.mean(kl)), "reward": float(np.mean(reward))}


def betas_grid() -> np.ndarray:
    return np.geomspace(0.02, 200.0, 400)


def main() -> None:
    args, p, seeds, out, work, sft, start = L.start(
        __doc__, HERE, "reward_kl_frontier", TASK, QUICK, FULL
    )
    ref, r = task_tables(p["prompts"])
    front = frontier(ref, r, betas_grid())
    r_max = float(np.mean(r.max(axis=1)))
    rows, records, done = [], [], []
    for label, (name, cargs, key, full, quick) in ALGOS.items():
        values = quick if args.quick else full
        if not values:
            continue
        base = lambda name=name, cargs=cargs: L.base_config(
            name, TASK, p["steps"], sft, "dataset", **cargs
        )
        grid = L.seeds_overrides([{key: v} for v in values], seeds)
        runs = L.sweep_runs(base, grid, os.path.join(work, name), args.finished_only)
        done += runs
        for v in values:
            mine = [x for x in runs if x["overrides"][key] == v]
            if not mine:
                continue
            kls = [x["summary"]["eval_after"]["true/kl_task_ref"] for x in mine]
            rews = [x["summary"]["eval_after"]["true/reward"] for x in mine]
            gaps = [frontier_reward_at(front, k, r_max) - w for k, w in zip(kls, rews)]
            excess = [k - frontier_kl_for(front, w) for k, w in zip(kls, rews)]
            rows.append(
                dict(algorithm=label, config=name, key=key, value=v, kl=L.mean_std(kls),
                     reward=L.mean_std(rews), gap=L.mean_std(gaps),
                     kl_excess=L.mean_std(excess), kl_runs=kls,
                     reward_runs=rews, gap_runs=gaps, optimum=optimum_point(ref, r, name, v))
            )  # fmt: skip
        keys = ["true/reward", "true/kl_task_ref", "true/kl_ref", "loss", "rewards/accuracies"]
        records += [dict(algorithm=label, **L.run_record(x, keys)) for x in runs]
    before = L.first_eval(done)
    result = dict(
        claim="DPO's (E[r], KL) points lie close to the exact reward–KL frontier of "
        "π*_β ∝ π_ref·exp(r/β) (Rafailov et al. 2023, arXiv 2305.18290, Fig. 2 left)",
        setup=dict(
            task=f"embedded:{TASK}",
            model=L.MODEL,
            quick=args.quick,
            reference="dataset (exact task π_ref)",
            hdpo_a=A_HDPO,
            **{**p, "seeds": seeds},
        ),  # fmt: skip
        sft_reference=dict(reward=before["true/reward"], kl_task_ref=before["true/kl_task_ref"]),
        task_ref_reward=float(np.mean([np.exp(ref[i]) @ r[i] for i in range(len(ref))])),
        r_max=r_max,
        frontier={k: v.tolist() for k, v in front.items()},
        rows=rows,
        runs=records,
        seconds=round(time.time() - start, 1),
    )
    L.write_json(os.path.join(out, "results.json"), result)
    plot(result, os.path.join(out, "frontier.png"))
    print(table(rows))
    print(f"total {result['seconds']:.0f} s")


def table(rows) -> str:
    lines = [
        "| algorithm | swept | value | KL(π‖π_ref) | E_π[r] | reward gap | excess KL | "
        "exact optimum (KL, E[r]) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for x in rows:
        o = x.get("optimum")
        aim = f"({o['kl']:.3f}, {o['reward']:.3f})" if o else "–"
        lines.append(
            f"| {x['algorithm']} | `{x['key']}` | {x['value']:g} | {L.fmt(*x['kl'])} | "
            f"{L.fmt(*x['reward'])} | {L.fmt(*x['gap'])} | {L.fmt(*x['kl_excess'])} | {aim} |"
        )
    return "\n".join(lines)


def plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=110)
    f = result["frontier"]
    xmax = max(4.0, min(8.0, max(k for x in result["rows"] for k in x["kl_runs"])))
    order = np.argsort(f["kl"])
    ks, rs = np.asarray(f["kl"])[order], np.asarray(f["reward"])[order]
    ax.plot([*ks, xmax], [*rs, result["r_max"]], "k-", lw=2,
            label="exact frontier π*_β")  # fmt: skip
    markers = "osD^v"
    for label, m in zip(ALGOS, markers):
        mine = [x for x in result["rows"] if x["algorithm"] == label]
        if not mine:
            continue
        ks = [k for x in mine for k in x["kl_runs"]]
        rs = [w for x in mine for w in x["reward_runs"]]
        dots = ax.scatter(ks, rs, marker=m, s=22, alpha=0.75, label=label)
        aims = [x["optimum"] for x in mine if x.get("optimum")]
        if aims:
            ax.scatter([o["kl"] for o in aims], [o["reward"] for o in aims], marker=m, s=60,
                       facecolors="none", edgecolors=dots.get_facecolor()[0][:3], lw=1.2,
                       label=f"{label}: its exact optimum")  # fmt: skip
    s = result["sft_reference"]
    ax.scatter([s["kl_task_ref"]], [s["reward"]], marker="*", s=120, c="k", label="SFT start")
    ax.set_xlabel("KL(π ‖ π_ref), exact (nats)")
    ax.set_ylabel("E_π[r], exact")
    ax.set_xlim(0, xmax * 1.03)
    ax.set_title("controlled task: reward vs KL (each point one run)")
    ax.legend(fontsize=7, loc="lower right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


if __name__ == "__main__":
    main()
