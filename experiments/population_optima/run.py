"""Population optima of DPO and MI-DPO; Blahut–Arimoto via the loss (mathematics §3.2, §3.7).

    python -m experiments.population_optima.run [--quick] [--seeds N] [--out DIR]

On random bandits (one per seed), the population losses — every (x, y_w, y_l) weighted by
ρ(x) μ(y_1|x) μ(y_2|x) σ(±Δr) — are minimised over tabular logits by BFGS through OUR
``mipo_loss`` in float64, and compared with the closed forms:

* DPO (ζ = π_ref):             argmin = π_ref e^{r/α} / Z, minimum = the Bayes risk;
* MI-DPO, fixed prompt-free ζ: argmin = ζ e^{r/α} / Z;
* Blahut–Arimoto through the loss (π-step: argmin of MI-DPO with the current ζ; ζ-step:
  ζ ← p_π = Σ_x ρ π) against the closed-form Blahut–Arimoto fixed point, whose points trace
  the reward–mutual-information curve max E[r] − α I(X;Y).
"""

from __future__ import annotations

import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from experiments import bandit as B  # noqa: E402
from experiments import repro  # noqa: E402

NAME = "population_optima"
N_X, K = 4, 6
OUTER = 400  # cap on Blahut–Arimoto steps through the loss


def one_seed(seed: int, alphas, curve_alphas) -> dict:
    b = B.make_bandit(seed, N_X, K)
    zeta_fixed = np.random.default_rng(1000 + seed).dirichlet(np.full(K, 2.0))
    risk = B.bayes_risk(b)
    rows = []
    for alpha in alphas:
        minimise = B.Minimiser(B.pair_loss(B.make_cfg(alpha), B.bt_pairs(b)))
        zeros = np.zeros((N_X, K))
        theta, loss = minimise(zeros, np.log(b.ref))
        pi_dpo, star = B.softmax(theta), B.gibbs(np.log(b.ref), b.r, alpha)
        theta, loss_mi = minimise(zeros, np.broadcast_to(np.log(zeta_fixed), (N_X, K)))
        pi_mi, star_mi = B.softmax(theta), B.gibbs(np.log(zeta_fixed)[None], b.r, alpha)
        pi_alt, zeta_alt, outer, _ = B.ba_by_loss(b, minimise, alpha, outer=OUTER)
        pi_ba, zeta_ba, closed_steps = B.blahut_arimoto(b, alpha)
        _, zeta_same, _ = B.blahut_arimoto(b, alpha, iters=outer, tol=0.0)  # as many steps
        rate = float(np.sum(b.rho * B.kl(pi_ba, zeta_ba[None])))
        rows.append(
            dict(
                alpha=alpha,
                dpo_max_abs=float(np.max(np.abs(pi_dpo - star))),
                dpo_loss_minus_bayes_risk=loss - risk,
                midpo_fixed_max_abs=float(np.max(np.abs(pi_mi - star_mi))),
                midpo_fixed_loss_minus_bayes_risk=loss_mi - risk,
                ba_loss_max_abs_pi=float(np.max(np.abs(pi_alt - pi_ba))),
                ba_loss_max_abs_zeta=float(np.max(np.abs(zeta_alt - zeta_ba))),
                ba_loss_outer_steps=outer,
                ba_closed_form_steps=closed_steps,
                ba_loss_same_steps_max_abs_zeta=float(np.max(np.abs(zeta_alt - zeta_same))),
                ba_rate_minus_mi=rate - B.mutual_information(b, pi_ba),
                ba_reward=B.expected_reward(b, pi_ba),
                ba_mi=B.mutual_information(b, pi_ba),
                ba_loss_reward=B.expected_reward(b, pi_alt),
                ba_loss_mi=B.mutual_information(b, pi_alt),
                dpo_reward=B.expected_reward(b, pi_dpo),
                dpo_mi=B.mutual_information(b, pi_dpo),
            )
        )
    curve = []
    for alpha in curve_alphas:
        pi_ba, _, _ = B.blahut_arimoto(b, alpha)
        star = B.gibbs(np.log(b.ref), b.r, alpha)
        curve.append(
            dict(alpha=float(alpha), ba_mi=B.mutual_information(b, pi_ba),
                 ba_reward=B.expected_reward(b, pi_ba), dpo_mi=B.mutual_information(b, star),
                 dpo_reward=B.expected_reward(b, star))
        )  # fmt: skip
    return dict(seed=seed, bandit=dict(rho=b.rho, r=b.r, ref=b.ref, mu=b.mu),
                zeta_fixed=zeta_fixed, bayes_risk=risk, rows=rows, curve=curve)  # fmt: skip


COLUMNS = (
    ("dpo_max_abs", "DPO: max|π − π_ref e^{r/α}/Z|"),
    ("dpo_loss_minus_bayes_risk", "DPO: L_min − Bayes risk"),
    ("midpo_fixed_max_abs", "MI-DPO fixed ζ: max|π − ζ e^{r/α}/Z|"),
    ("midpo_fixed_loss_minus_bayes_risk", "MI-DPO fixed ζ: L_min − Bayes risk"),
    ("ba_loss_max_abs_pi", "BA through the loss: max|π − π_BA|"),
    ("ba_loss_max_abs_zeta", "BA through the loss: max|ζ − ζ_BA|"),
    (
        "ba_loss_same_steps_max_abs_zeta",
        "BA through the loss vs closed-form BA, same steps: max|Δζ|",
    ),
    ("ba_rate_minus_mi", "BA fixed point: E_x KL(π‖ζ) − I(X;Y)"),
)


def summarise(per_seed, alphas) -> list[dict]:
    table = []
    for i, alpha in enumerate(alphas):
        row = {"alpha": alpha}
        for key, _ in COLUMNS + (("ba_loss_outer_steps", ""), ("ba_closed_form_steps", "")):
            row[key] = repro.mean_std([s["rows"][i][key] for s in per_seed])
        table.append(row)
    return table


def plot(per_seed, path):
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for j, s in enumerate(per_seed):
        c = s["curve"]
        kw = dict(alpha=1.0 if j == 0 else 0.35)
        ax.plot(
            [p["ba_mi"] for p in c],
            [p["ba_reward"] for p in c],
            "-",
            color="C0",
            label="Blahut–Arimoto (closed form): max E[r] − α I" if j == 0 else None,
            **kw,
        )
        ax.plot(
            [p["dpo_mi"] for p in c],
            [p["dpo_reward"] for p in c],
            "--",
            color="C1",
            label="DPO optimum π_ref e^{r/α}/Z (closed form)" if j == 0 else None,
            **kw,
        )
        ax.plot(
            [r["ba_loss_mi"] for r in s["rows"]],
            [r["ba_loss_reward"] for r in s["rows"]],
            "o",
            mfc="none",
            color="C0",
            ms=8,
            label="BA through the MI-DPO loss (BFGS)" if j == 0 else None,
            **kw,
        )
        ax.plot(
            [r["dpo_mi"] for r in s["rows"]],
            [r["dpo_reward"] for r in s["rows"]],
            "x",
            color="C1",
            ms=7,
            label="DPO loss minimiser (BFGS)" if j == 0 else None,
            **kw,
        )
    ax.set_xlabel("I(X;Y) [nats]")
    ax.set_ylabel("E[r]")
    ax.set_title(f"Reward–information curve, {len(per_seed)} random bandits (X={N_X}, K={K})",
                 fontsize=10)  # fmt: skip
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(alpha=0.3)
    return repro.savefig(fig, path)


def main(argv=None):
    args = repro.parse(NAME, argv)
    alphas = (0.25, 0.5) if args.quick else (0.25, 0.5, 1.0, 2.0)
    curve_alphas = np.geomspace(0.05, 20.0, 12 if args.quick else 40)
    per_seed = [one_seed(seed, alphas, curve_alphas) for seed in range(args.seeds)]
    table = summarise(per_seed, alphas)
    png = plot(per_seed, os.path.join(args.out, f"{NAME}.png"))
    worst = {key: max(abs(v) for r in table for v in r[key]["values"]) for key, _ in COLUMNS}
    path = repro.write(
        args,
        dict(
            name=NAME,
            setup=dict(n_x=N_X, k=K, alphas=alphas, curve_alphas=curve_alphas,
                       optimiser="scipy BFGS, gtol 1e-11, float64, from θ = 0",
                       loss="mipo_jax.losses.mipo_loss, prior 'reference' fed log ζ"),
            table=table, worst=worst, per_seed=per_seed, plot=os.path.basename(png),
        ),
    )  # fmt: skip
    print(f"{NAME}: worst over seeds and α: " + ", ".join(f"{k} {v:.2e}" for k, v in worst.items()))
    print(f"wrote {path} and {png}")
    return path


if __name__ == "__main__":
    main()
