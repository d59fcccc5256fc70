"""WPO (Zhou et al. 2024, arXiv 2406.11827; TRL HEAD "use_weighting"; mathematics §2.25).

DPO with each pair's loss weighted by w(y_w)·w(y_l), w(y) = exp(mean_t[ℓ^π_t − log Σ_v π²]),
computed without gradient (HEAD: no clamp). MI-DPO under a reweighted data distribution.

Run:

  python -m mipo_jax.main --config=configs/wpo.py --workdir=/tmp/wpo
"""

from configs import common
from mipo_jax.losses import loss_config


def get_config(arg=None):
    arg = common.parse_arg(arg, tiny=False)
    loss = loss_config("reference")
    loss.alpha = 0.1
    loss.weighting = "wpo"
    return common.make("wpo", loss, arg)


def sweep(add):
    for beta in (0.01, 0.1):
        add(**{"loss.alpha": beta})
