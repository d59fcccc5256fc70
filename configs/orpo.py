"""ORPO (Hong, Lee, Thorne 2024, arXiv 2403.07691; TRL ``odds_ratio_loss``; mathematics §2.15).

L = NLL_w − λ log σ(log odds(y_w) − log odds(y_l)), log odds = A − log(1 − e^A) with A the
average log-prob. The odds term is MI-DPO with ``normalize='mean'``, α = 1 and the prior
log ζ = |y| log(1 − e^{A}); λ = 0.1 (TRL's β; the paper used 0.25/0.2/0.1).

Run:

  python -m mipo_jax.main --config=configs/orpo.py --workdir=/tmp/orpo
"""

from configs import common
from mipo_jax.losses import loss_config


def get_config(arg=None):
    arg = common.parse_arg(arg, tiny=False)
    loss = loss_config("odds")
    loss.alpha = 1.0
    loss.normalize = "mean"
    loss.link_weights = (0.1,)  # λ
    loss.sft_weight = 1.0
    return common.make("orpo", loss, arg)


def sweep(add):
    for lam in (0.1, 0.2, 0.25):
        add(**{"loss.link_weights": (lam,)})
