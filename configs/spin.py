"""SPIN (Chen et al. 2024, arXiv 2401.01335): self-play; ζ = π_t, the previous iterate.

Chosen responses come from the SFT data, rejected ones are sampled from π_t; the loss is the
logistic ℓ(λ log π_θ/π_t (y) − λ log π_θ/π_t (y')) with λ = 0.1, i.e. MI-DPO with
ζ = π_t and α = λ. Run:

  python -m mipo_jax.main --config=configs/spin.py --workdir=/tmp/spin
"""

from configs import common
from mipo_jax.losses import loss_config


def get_config(arg=None):
    arg = common.parse_arg(arg, tiny=False, rounds=3)
    loss = loss_config("previous_policy")
    loss.alpha = 0.1
    return common.make(
        "spin",
        loss,
        arg,
        learning_rate=5e-7,
        rounds=dict(num_rounds=arg.rounds, steps_per_round=300, rejected_from="policy"),
    )


def sweep(add):
    for lam in (0.1, 1.0):
        add(**{"loss.alpha": lam})
