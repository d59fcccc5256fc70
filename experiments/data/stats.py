"""The statistics block of each embedded dataset's datasheet (markdown, deterministic)."""

from __future__ import annotations

import collections

import numpy as np

from mipo_jax.data.tasks import sentiment

BETAS = (0.1, 0.25, 0.5, 1.0, 2.0)


def block(name: str, splits: dict[str, list[dict]]) -> str:
    lines = ["| split | rows |", "|---|---|"]
    lines += [f"| {s} | {len(rows)} |" for s, rows in splits.items()]
    lines.append("")
    if name in sentiment.TASKS:
        lines += _sentiment(name, splits)
    elif name == "arithmetic":
        counts = collections.Counter(r["mistake"] for rows in splits.values() for r in rows)
        lines += ["Rejected answers by mistake type (both splits):", ""]
        lines += [f"- {k}: {v}" for k, v in sorted(counts.items())]
    else:
        rows = [r for rs in splits.values() for r in rs]
        counts = collections.Counter(r["task"] for r in rows)
        lines += ["Rows by task (both splits):", ""]
        lines += [f"- {k}: {v}" for k, v in sorted(counts.items())]
        turns = sum(sum(m["role"] == "user" for m in r["prompt"]) > 1 for r in rows)
        system = sum(r["prompt"][0]["role"] == "system" for r in rows)
        lines += ["", f"Two-turn prompts: {turns}; prompts with a system message: {system}."]
    return "\n".join(lines)


def _sentiment(task: str, splits: dict[str, list[dict]]) -> list[str]:
    train = splits["train"]
    higher = np.mean([r["chosen_reward"] > r["rejected_reward"] for r in train])
    ties = np.mean([r["chosen_reward"] == r["rejected_reward"] for r in train])
    lines = [
        f"Train pairs whose chosen has the higher true reward: {higher:.3f} (ties {ties:.3f}).",
    ]
    if task == "length_biased":
        longer = np.mean([len(r["chosen"].split()) > len(r["rejected"].split()) for r in train])
        shorter = np.mean([len(r["chosen"].split()) < len(r["rejected"].split()) for r in train])
        lines.append(f"Train pairs whose chosen is longer: {longer:.3f} (shorter {shorter:.3f}).")
    prompts = [sentiment.parse_prompt(r["prompt"]) for r in splits["test"]]
    lines += [
        "",
        "Exact values averaged over the test prompts: the reference policy, and the",
        "KL-regularised optimum π* ∝ π_ref·exp(r/β) for the true reward r"
        + (" and for the labeller's length-biased score s" if task == "length_biased" else "")
        + ".",
        "",
        "| policy | E[r] | KL(π‖π_ref) | E[words] |",
        "|---|---|---|---|",
    ]
    words = np.array([len(y) for y in sentiment.completions(task)], float)
    bonus = sentiment.LENGTH_BONUS * words if task == "length_biased" else 0.0

    def row(name, logp_fn):
        vals = []
        for p in prompts:
            ref, r = sentiment.tables(task, p)
            logp = logp_fn(ref, r)
            m = sentiment.exact_metrics(logp, ref, r)
            vals.append((m["reward"], m["kl"], float(np.exp(logp) @ words)))
        reward, kl, n = np.mean(vals, axis=0)
        return f"| {name} | {reward:.4f} | {kl:.4f} | {n:.3f} |"

    lines.append(row("π_ref", lambda ref, r: ref))
    for beta in BETAS:
        lines.append(
            row(f"π*, β={beta}", lambda ref, r, b=beta: sentiment.optimal_logprobs(ref, r, b))
        )
    if task == "length_biased":
        for beta in BETAS:
            lines.append(
                row(
                    f"π*(s), β={beta}",
                    lambda ref, r, b=beta: sentiment.optimal_logprobs(ref, r + bonus, b),
                )
            )
    return lines
