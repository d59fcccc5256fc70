"""IPO against DPO under deterministic preferences (Azar et al. 2023, arXiv 2310.12036, §5.3).

    python -m experiments.ipo_vs_dpo.run [--quick] [--seeds N] [--out DIR]

Claim: when y_w is always preferred, DPO's implicit margin h = log π(y_w)/π_ref(y_w) −
log π(y_l)/π_ref(y_l) grows without bound (π(y_l) → 0) whatever β, while IPO's settles at
1/(2τ) (mathematics §2.9, §3.6).

* Bandit (exact): two responses, y_0 ≻ y_1 always, π_ref per seed; plain gradient descent on
  the logits of the population loss through OUR ``mipo_loss`` (links ``sigmoid`` and ``ipo``,
  α = β = τ), float64.
* Tiny LM (the trainer): configs/dpo.py and configs/ipo.py, started from a reference
  fine-tuned on the controlled task (`experiments.lm`), trained on controlled-task pairs
  labelled by the true reward without noise. IPO's h is per token (``loss.normalize='mean'``,
  as TRL); the trainer logs α·h as ``scores/margins`` (IPO) and α·Σρ as ``rewards/margins``
  (DPO, summed), so both are shown as the per-token h = margin / (α·|y|) with |y| = 5 tokens
  (4 words and EOS for every completion of the task).
"""

from __future__ import annotations

import functools
import os

import matplotlib

matplotlib.use("Agg")
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

import mipo_jax  # noqa: E402
from experiments import bandit as B  # noqa: E402
from experiments import lm, repro, sweep  # noqa: E402
from mipo_jax import compile_cache  # noqa: E402

NAME = "ipo_vs_dpo"
LINKS = {"dpo": "sigmoid", "ipo": "ipo"}
COMPLETION_TOKENS = 5  # every controlled-task completion: 4 words + EOS


# ---- bandit -----------------------------------------------------------------------------


def bandit_runs(seeds: int, taus, steps: int, lr: float) -> list[dict]:
    """Gradient descent from π = π_ref on the deterministic two-response bandit."""
    pairs = (np.array([0]), np.array([0]), np.array([1]), np.array([1.0]))
    keep = np.unique(np.geomspace(1, steps, 200).astype(int)) - 1
    out = []
    for seed in range(seeds):
        p = np.random.default_rng(seed).uniform(0.2, 0.8)
        log_ref = np.log(np.array([[p, 1.0 - p]]))
        for tau in taus:
            for alg, link in LINKS.items():
                loss = B.pair_loss(B.make_cfg(tau, link), pairs)

                def record(theta, loss=loss, log_ref=log_ref):
                    logpi = jax.nn.log_softmax(theta, -1)[0]
                    h = (logpi[0] - log_ref[0, 0]) - (logpi[1] - log_ref[0, 1])
                    return jnp.stack([h, jnp.exp(logpi[1]), loss(theta, jnp.asarray(log_ref))])

                _, trace = B.descent_trace(
                    loss, log_ref, log_ref, steps=steps, lr=lr, record=record
                )
                h, pi_l, value = trace.T
                out.append(
                    dict(seed=seed, ref_w=p, tau=tau, alg=alg, link=link, lr=lr, steps=steps,
                         target=0.5 / tau, h_final=h[-1], h_tenth=h[steps // 10 - 1],
                         pi_l_final=pi_l[-1], loss_final=value[-1],
                         loss_monotone=bool(np.all(np.diff(value) <= 1e-15)),
                         ipo_pi_l=float(1 / (1 + p / (1 - p) * np.exp(0.5 / tau))),
                         step=keep + 1, h=h[keep])
                )  # fmt: skip
    return out


def bandit_table(runs, taus) -> list[dict]:
    table = []
    for tau in taus:
        for alg in LINKS:
            rs = [r for r in runs if r["tau"] == tau and r["alg"] == alg]
            table.append(
                dict(tau=tau, alg=alg, target=0.5 / tau,
                     h_final=repro.mean_std([r["h_final"] for r in rs]),
                     h_over_target=repro.mean_std([r["h_final"] * 2 * tau for r in rs]),
                     h_tenth=repro.mean_std([r["h_tenth"] for r in rs]),
                     pi_l_final=repro.mean_std([r["pi_l_final"] for r in rs]),
                     loss_monotone=all(r["loss_monotone"] for r in rs))
            )  # fmt: skip
    return table


# ---- tiny LM ------------------------------------------------------------------------------


def ipo_margin_ratio(ref_logp, r) -> float:
    """Mean margin of IPO's population minimiser over deterministic pairs, in units of 1/(2τ).

    Pairs (y_1, y_2) ~ π_ref², ties dropped, the higher reward chosen. With a free
    log π/π_ref = f(y), IPO minimises E[(f(y_w) − f(y_l) − c)²]: a weighted least-squares fit
    whose solution depends on y only through r(y) (the normal equations of any response
    involve the others only through their reward levels), so it is solved on the levels.
    Isolated pairs would give exactly c; overlapping comparisons give a mean below it.
    """
    p = np.exp(np.asarray(ref_logp, np.float64))
    levels = np.unique(r)
    w_level = np.array([p[r == v].sum() for v in levels])
    rows, weights = [], []
    for i in range(len(levels)):
        for j in range(i):
            row = np.zeros(len(levels))
            row[i], row[j] = 1.0, -1.0
            rows.append(row)
            weights.append(w_level[i] * w_level[j])
    a, w = np.array(rows), np.array(weights)
    f = np.linalg.lstsq(a * np.sqrt(w)[:, None], np.sqrt(w), rcond=None)[0]  # target c = 1
    return float(w @ (a @ f) / w.sum())


def predicted_lm_ratio() -> float:
    """`ipo_margin_ratio` of the controlled task, averaged over the prompt's last word."""
    from mipo_jax.data.tasks import sentiment

    ratios = [ipo_margin_ratio(*sentiment.tables("controlled", (w,))) for w in range(8)]
    return float(np.mean(ratios))


def lm_runs(args, tau: float, steps: int, lr: float) -> list[dict]:
    seeds = list(range(args.seeds))
    inits = {s: "random" for s in seeds}
    if not args.quick:
        inits = lm.sft_inits(seeds)
    out = []
    for alg in LINKS:
        for seed in seeds:

            def base(alg=alg, init=inits[seed]):
                c = mipo_jax.get_config(alg)
                lm.small_model(c)
                c.model.init = init
                c.loss.alpha = tau
                c.optim.learning_rate = lr
                c.sft.steps = 0
                c.train.update(dict(num_steps=steps, eval_every=0, eval_batches=0,
                                    task_eval_prompts=0))  # fmt: skip
                return c

            train = functools.partial(
                mipo_jax.run, train_data=lm.deterministic_pairs(4096, 100 + seed)
            )
            (run,) = sweep.run_grid(
                base, [{"seed": seed}], os.path.join(args.runs, f"{alg}_tau={tau}"), train=train
            )
            keys = ("rewards/margins", "scores/margins", "logps/chosen", "logps/rejected", "loss")
            curve = lm.train_curve(run["workdir"], keys)
            margin = curve["scores/margins"] if alg == "ipo" else curve["rewards/margins"]
            h = margin / tau / (1 if alg == "ipo" else COMPLETION_TOKENS)
            if alg == "ipo":  # |y| check: Σρ / mean ρ of the same pairs
                moved = np.abs(curve["scores/margins"]) > 1e-3  # not the steps at π = π_ref
                ratio = curve["rewards/margins"][moved] / curve["scores/margins"][moved]
                assert np.allclose(ratio, COMPLETION_TOKENS, rtol=1e-3), ratio[:5]
            tail = slice(int(0.8 * len(h)), None)
            out.append(
                dict(alg=alg, seed=seed, tau=tau, lr=lr, steps=steps, init=inits[seed],
                     workdir=run["workdir"], config=run["config"], step=curve["step"], h=h,
                     h_final=float(np.mean(h[tail])),
                     h_over_target=float(np.mean(h[tail]) * 2 * tau),
                     logps_rejected_first=float(curve["logps/rejected"][0]),
                     logps_rejected_final=float(np.mean(curve["logps/rejected"][tail])),
                     logps_chosen_first=float(curve["logps/chosen"][0]),
                     logps_chosen_final=float(np.mean(curve["logps/chosen"][tail])),
                     loss_final=float(np.mean(curve["loss"][tail])))
            )  # fmt: skip
    return out


def lm_table(runs) -> list[dict]:
    table = []
    for alg in LINKS:
        rs = [r for r in runs if r["alg"] == alg]
        row = dict(alg=alg, tau=rs[0]["tau"], target=0.5 / rs[0]["tau"])
        for key in ("h_final", "h_over_target", "logps_rejected_first", "logps_rejected_final",
                    "logps_chosen_final", "loss_final"):  # fmt: skip
            row[key] = repro.mean_std([r[key] for r in rs])
        table.append(row)
    return table


# ---- plot ---------------------------------------------------------------------------------


def smooth(x, w=10):
    return np.convolve(x, np.ones(w) / w, mode="valid") if len(x) > w else x


def plot(bandit, lm_out, taus, path):
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2))
    for i, tau in enumerate(taus):
        for alg, style in (("dpo", "-"), ("ipo", "--")):
            r = next(r for r in bandit if r["tau"] == tau and r["alg"] == alg and r["seed"] == 0)
            a.plot(r["step"], r["h"], style, color=f"C{i}", label=f"{alg.upper()} τ=β={tau:g}")
        a.axhline(0.5 / tau, color=f"C{i}", lw=0.8, ls=":")
    a.set_xscale("log")
    a.set_xlabel("gradient step")
    a.set_ylabel("h = log π(y_w)/π_ref(y_w) − log π(y_l)/π_ref(y_l)")
    a.set_title("Bandit, exact (dotted: 1/(2τ))", fontsize=10)
    a.legend(fontsize=7, ncol=2)
    a.grid(alpha=0.3)
    tau = lm_out[0]["tau"]
    for alg, color in (("dpo", "C3"), ("ipo", "C2")):
        rs = [r for r in lm_out if r["alg"] == alg]
        hs = np.stack([smooth(r["h"]) for r in rs])
        steps = rs[0]["step"][len(rs[0]["step"]) - hs.shape[1] :]
        m, s = hs.mean(0), hs.std(0)
        b.plot(steps, m, color=color, label=f"{alg.upper()} (τ=β={tau:g}), {len(rs)} seeds")
        b.fill_between(steps, m - s, m + s, color=color, alpha=0.2)
    b.axhline(0.5 / tau, color="k", lw=0.8, ls=":", label="1/(2τ)")
    b.axhline(predicted_lm_ratio() * 0.5 / tau, color="C2", lw=0.8, ls="--",
              label="IPO population minimiser (exact)")  # fmt: skip
    b.set_xlabel("training step")
    b.set_ylabel("per-token h on the training batch (10-step mean)")
    b.set_title("Tiny LM, controlled task, deterministic labels", fontsize=10)
    b.legend(fontsize=8)
    b.grid(alpha=0.3)
    return repro.savefig(fig, path)


def main(argv=None):
    args = repro.parse(NAME, argv)
    taus = (0.1, 0.5, 1.0)
    bandit = bandit_runs(args.seeds, taus, steps=2000 if args.quick else 20_000, lr=0.1)
    lm_tau = 0.25
    lm_out = lm_runs(args, lm_tau, steps=60 if args.quick else 150, lr=2e-3)
    btable, ltable = bandit_table(bandit, taus), lm_table(lm_out)
    predicted = predicted_lm_ratio()
    png = plot(bandit, lm_out, taus, os.path.join(args.out, f"{NAME}.png"))
    path = repro.write(
        args,
        dict(name=NAME, bandit_table=btable, lm_table=ltable, bandit_runs=bandit, lm_runs=lm_out,
             lm_ipo_predicted_ratio=predicted,
             setup=dict(bandit_taus=taus, bandit_lr=0.1, lm_tau=lm_tau,
                        completion_tokens=COMPLETION_TOKENS),
             plot=os.path.basename(png)),
    )  # fmt: skip
    for r in btable + ltable:
        print(r["alg"], r["tau"], "h/target", repro.pm(r["h_over_target"]))
    print(f"IPO population minimiser on the LM's pairs: mean h = {predicted:.4f} / (2τ)")
    print(f"wrote {path} and {png}")
    return path


if __name__ == "__main__":
    compile_cache.enable()  # a script only: the test suite keeps JAX's global state alone
    main()
