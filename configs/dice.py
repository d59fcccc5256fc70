"""DICE (Chen et al. 2024, arXiv 2406.09760): iterative DPO whose prior is the previous round.

Each round's loss is MI-DPO with ζ = π_{t−1} (the round's starting model); pairs come from 16
samples per prompt ranked by the length-regularised implicit reward
s̃(y) = log π_{t−1}(y|x) − log π_{t−2}(y|x) − α_L·len(y) with α_L found by grid search
(``mipo_jax.priors.dice``). Code defaults: β = 0.1, lr 5e-7, 300 steps per round. Run:

  python -m mipo_jax.main --config=configs/dice.py --workdir=/tmp/dice
"""

from configs import common
from mipo_jax.losses import loss_config


def get_config(arg=None):
    arg = common.parse_arg(arg, tiny=False, rounds=2)
    loss = loss_config("previous_policy")
    loss.alpha = 0.1
    return common.make(
        "dice",
        loss,
        arg,
        learning_rate=5e-7,
        rounds=dict(
            num_rounds=arg.rounds,
            steps_per_round=300,
            samples_per_prompt=16,
            length_alpha=-1.0,  # < 0: grid search over [0, 1) in steps of 0.001
            mix_gamma=0.0,  # share of offline pairs replayed (experience replay)
        ),
    )


def sweep(add):
    for gamma in (0.0, 0.25, 0.5):
        add(**{"rounds.mix_gamma": gamma})
