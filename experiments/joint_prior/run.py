"""Does optimising the prior jointly with the policy reach better minima? (arXiv 2501.01544)

    python -m experiments.joint_prior.run [--quick] [--seeds N] [--out DIR]

MI-DPO's paper suggests that optimising the prior ζ jointly with the policy π may reach
better minima. Compared here (mathematics §1.2, §1.5, §3.7), at the same α:

* DPO (ζ = π_ref);
* MI-DPO with a fixed prompt-free prior (ζ uniform);
* Blahut–Arimoto: π ← argmin of the population MI-DPO loss with ζ fixed, ζ ← p_π (bandit);
* the learnable prior ζ_φ (``loss.prior.name='learned'``, configs/mipo_learned.py), trained
  jointly with π, with the MI term (mi_weight 1) and without it (mi_weight 0).

Bandit (exact, float64, population losses through OUR ``mipo_loss``): E[r], I(X;Y), E_x KL(π‖π_ref),
the two objectives E[r] − α I and E[r] − α KL, the loss above its Bayes risk, and the distance
to the MI-optimal policy (the Blahut–Arimoto fixed point, closed form).
Tiny LM (the trainer, controlled task, BT labels, reference fine-tuned on the task): the exact
E[r] and KL(π‖π_ref) over held-out prompts. There r does not depend on the prompt, so the
MI-optimal policy is prompt-free and puts all its mass on the highest-reward completions
(E[r] = 4, I = 0), while the KL-optimal one is π_ref e^{r/α}/Z.
"""

from __future__ import annotations

import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

import mipo_jax  # noqa: E402
from experiments import bandit as B  # noqa: E402
from experiments import lm, repro, sweep  # noqa: E402
from mipo_jax import compile_cache  # noqa: E402

NAME = "joint_prior"
N_X, K = 4, 6
METHODS = {
    "dpo": "DPO (ζ = π_ref)",
    "uniform": "MI-DPO, fixed ζ uniform",
    "ba": "Blahut–Arimoto (π-step = loss minimiser)",
    "learned_mi": "learned ζ_φ + MI term (joint)",
    "learned": "learned ζ_φ, no MI term (joint)",
}
EVAL_PROMPTS = 4  # held-out prompts scored exactly (4 x 4096 completions)
METRICS = ("reward", "mi", "kl_ref", "mi_objective", "kl_objective", "loss_gap", "dist_ba")


# ---- bandit -----------------------------------------------------------------------------


def bandit_seed(seed: int, alphas, joint_steps: int) -> list[dict]:
    b = B.make_bandit(seed, N_X, K)
    risk = B.bayes_risk(b)
    out = []
    for alpha in alphas:
        minimise = B.Minimiser(B.pair_loss(B.make_cfg(alpha), B.bt_pairs(b)))
        pi_ba_exact, zeta_ba_exact, _ = B.blahut_arimoto(b, alpha)
        zeros = np.zeros((N_X, K))
        found = {}
        theta, _ = minimise(zeros, np.log(b.ref))
        found["dpo"] = (B.softmax(theta), np.log(b.ref))
        uniform = np.full((N_X, K), -np.log(K))
        theta, _ = minimise(zeros, uniform)
        found["uniform"] = (B.softmax(theta), uniform)
        pi, _, _, used = B.ba_by_loss(b, minimise, alpha, outer=400)
        found["ba"] = (pi, np.broadcast_to(np.log(used), (N_X, K)))  # the last π-step's ζ
        for key, weight in (("learned_mi", 1.0), ("learned", 0.0)):
            loss = B.joint_loss(b, B.make_cfg(alpha, prior="learned", mi_weight=weight))
            theta, phi = B.joint_descent(loss, np.log(b.ref), np.zeros(K), steps=joint_steps)
            found[key] = (B.softmax(theta), np.broadcast_to(B.log_softmax(phi), (N_X, K)))
        for key, (pi, log_prior) in found.items():
            out.append(
                dict(seed=seed, alpha=alpha, method=key,
                     reward=B.expected_reward(b, pi), mi=B.mutual_information(b, pi),
                     kl_ref=B.kl_to_ref(b, pi), mi_objective=B.mi_objective(b, pi, alpha),
                     kl_objective=B.kl_objective(b, pi, alpha),
                     loss_gap=minimise.value(np.log(pi), log_prior) - risk,
                     dist_ba=float(np.max(np.abs(pi - pi_ba_exact))),
                     prior=np.exp(log_prior[0]) if key != "dpo" else None)
            )  # fmt: skip
    return out


def bandit_table(rows, alphas) -> list[dict]:
    table = []
    for alpha in alphas:
        for key in METHODS:
            rs = [r for r in rows if r["alpha"] == alpha and r["method"] == key]
            table.append(
                dict(
                    alpha=alpha,
                    method=key,
                    **{m: repro.mean_std([r[m] for r in rs]) for m in METRICS},
                )
            )
    return table


# ---- tiny LM ------------------------------------------------------------------------------

LM_METHODS = {
    "dpo": ("dpo", {}),
    "uniform": ("dpo", {"loss.prior.name": "uniform"}),
    "learned_mi": ("mipo_learned", {"loss.mi_weight": 1.0}),
    "learned": ("mipo_learned", {"loss.mi_weight": 0.0}),
}


def lm_runs(args, alpha: float, steps: int) -> list[dict]:
    seeds = list(range(args.seeds))
    inits = {s: "random" for s in seeds} if args.quick else lm.sft_inits(seeds)
    # quick: a smoke test of this file's trainer path (the learned prior's own path is covered
    # by the trainer's tests; its compilation alone would take most of the quick budget)
    methods = ("dpo",) if args.quick else tuple(LM_METHODS)
    out = []
    for key in methods:
        alg, extra = LM_METHODS[key]
        for seed in seeds:

            def base(alg=alg, extra=extra, init=inits[seed]):
                c = mipo_jax.get_config(alg)
                lm.small_model(c)
                c.model.init = init
                c.loss.alpha = alpha
                c.sft.steps = 0
                c.data.source = "embedded:controlled"
                prompts = 1 if args.quick else EVAL_PROMPTS
                c.train.update(dict(num_steps=steps, eval_every=0, eval_batches=2,
                                    task_eval_prompts=prompts))  # fmt: skip
                return sweep.apply(c, extra)

            (run,) = sweep.run_grid(base, [{"seed": seed}], os.path.join(args.runs, key))
            before, after = run["summary"]["eval_before"], run["summary"]["eval_after"]
            out.append(
                dict(method=key, seed=seed, alpha=alpha, steps=steps, init=inits[seed],
                     workdir=run["workdir"], config=run["config"],
                     reward_before=before["true/reward"], reward=after["true/reward"],
                     kl_ref=after["true/kl_ref"], kl_task_ref=after["true/kl_task_ref"],
                     eval_loss=after["loss"], seconds=run["summary"]["seconds"])
            )  # fmt: skip
    return out


def lm_table(runs) -> list[dict]:
    table = []
    for key in LM_METHODS:
        rs = [r for r in runs if r["method"] == key]
        if rs:
            table.append(
                dict(method=key, **{m: repro.mean_std([r[m] for r in rs])
                                    for m in ("reward", "kl_ref", "kl_task_ref", "eval_loss")})
            )  # fmt: skip
    return table


def lm_baselines(alpha: float) -> dict:
    """E[r] of the task's π_ref and of π_ref e^{r/α}/Z on the evaluation prompts."""
    from mipo_jax.data.embedded import load_tokenizer
    from mipo_jax.train.task_eval import TaskEval

    task = TaskEval("embedded:controlled", load_tokenizer("toy_words"), EVAL_PROMPTS)
    risks = [_bayes_risk(ref, r) for ref, r in zip(task.task_ref, task.reward, strict=True)]
    return dict(task.baselines(alpha), mi_optimum_reward=float(task.reward.max()),
                bayes_risk=float(np.mean(risks)))  # fmt: skip


def _bayes_risk(ref_logp, r) -> float:
    """E[H_b(σ(r_1 − r_2))] over pairs y_1 ≠ y_2 ~ π_ref² (the controlled task's pairs): the
    least held-out preference loss any implicit reward can have."""
    p = np.exp(ref_logp)
    levels = np.unique(r)
    w = np.array([p[r == v].sum() for v in levels])
    d = levels[:, None] - levels[None, :]
    h_b = np.logaddexp(0, -d) / (1 + np.exp(-d)) + np.logaddexp(0, d) / (1 + np.exp(d))
    total = w @ h_b @ w - np.sum(p**2) * np.log(2)  # identical sequences are never a pair
    return float(total / (1 - np.sum(p**2)))


# ---- plot ---------------------------------------------------------------------------------

MARKERS = {"dpo": "s", "uniform": "^", "ba": "o", "learned_mi": "*", "learned": "x"}


def plot(rows, lm_out, baselines, alpha, path):
    fig, (a, b) = plt.subplots(1, 2, figsize=(11.5, 4.3))
    bandit0 = B.make_bandit(0, N_X, K)
    curve = [B.blahut_arimoto(bandit0, al)[0] for al in np.geomspace(0.05, 20, 40)]
    a.plot([B.mutual_information(bandit0, p) for p in curve],
           [B.expected_reward(bandit0, p) for p in curve], "-", color="0.6",
           label="max E[r] − α I over α (Blahut–Arimoto)")  # fmt: skip
    for i, key in enumerate(METHODS):
        r = next(r for r in rows if r["seed"] == 0 and r["alpha"] == alpha and r["method"] == key)
        a.plot(r["mi"], r["reward"], MARKERS[key], color=f"C{i}", ms=10 if key != "ba" else 12,
               mfc="none" if key == "ba" else None, label=METHODS[key])  # fmt: skip
    a.set_xlabel("I(X;Y) [nats]")
    a.set_ylabel("E[r]")
    a.set_title(f"Bandit (seed 0), α = {alpha:g}: population minimisers", fontsize=10)
    a.legend(fontsize=7, loc="lower right")
    a.grid(alpha=0.3)
    for key in LM_METHODS:
        rs = [r for r in lm_out if r["method"] == key]
        if not rs:
            continue
        kl, rew = np.array([r["kl_ref"] for r in rs]), np.array([r["reward"] for r in rs])
        b.errorbar(kl.mean(), rew.mean(), xerr=kl.std(), yerr=rew.std(), fmt=MARKERS[key],
                   color=f"C{[*METHODS].index(key)}", ms=9, capsize=3,
                   label=f"{METHODS[key]} ({len(rs)} seeds)")  # fmt: skip
    b.plot(baselines["optimum_kl"], baselines["optimum_reward"], "P", color="0.4", ms=9,
           label="π_ref e^{r/α}/Z, task's π_ref (KL-optimal)")  # fmt: skip
    b.axhline(baselines["mi_optimum_reward"], color="k", ls=":", lw=0.8,
              label="MI-optimal E[r] (r is prompt-free: argmax)")  # fmt: skip
    b.set_xlabel(f"KL(π ‖ π_ref), exact over {EVAL_PROMPTS} held-out prompts")
    b.set_ylabel("E[r], exact")
    b.set_title(f"Tiny LM (trainer), controlled task, α = {lm_out[0]['alpha']:g}", fontsize=10)
    b.legend(fontsize=7, loc="lower right")
    b.grid(alpha=0.3)
    return repro.savefig(fig, path)


def main(argv=None):
    args = repro.parse(NAME, argv)
    alphas = (0.5,) if args.quick else (0.5, 1.0)
    rows = []
    for seed in range(args.seeds):
        rows += bandit_seed(seed, alphas, joint_steps=6000)
    lm_alpha = 0.5
    lm_out = lm_runs(args, lm_alpha, steps=5 if args.quick else 100)
    baselines = lm_baselines(lm_alpha)
    btable, ltable = bandit_table(rows, alphas), lm_table(lm_out)
    png = plot(rows, lm_out, baselines, alphas[0], os.path.join(args.out, f"{NAME}.png"))
    path = repro.write(
        args,
        dict(name=NAME, methods=METHODS, bandit_table=btable, lm_table=ltable,
             lm_baselines=baselines, bandit_rows=rows, lm_runs=lm_out,
             setup=dict(n_x=N_X, k=K, alphas=alphas, lm_alpha=lm_alpha, joint_steps=6000,
                        joint_optimiser="heavy-ball descent, lr 2, momentum 0.9, from "
                        "θ = log π_ref, φ = 0"),
             plot=os.path.basename(png)),
    )  # fmt: skip
    for r in btable:
        print(r["alpha"], r["method"], {m: f"{r[m]['mean']:.4g}" for m in METRICS})
    for r in ltable:
        print("LM", r["method"], repro.pm(r["reward"]), repro.pm(r["kl_ref"]))
    print(f"wrote {path} and {png}")
    return path


if __name__ == "__main__":
    compile_cache.enable()  # a script only: the test suite keeps JAX's global state alone
    main()
