"""EXO (Ji et al. 2024, arXiv 2402.00856; TRL "exo_pair"; mathematics §2.12).

Reverse KL to soft labels: σ(z)[log σ(z) − log(1−ε)] + σ(−z)[log σ(−z) − log ε], ε = 1e-3.

Run:

  python -m mipo_jax.main --config=configs/exo.py --workdir=/tmp/exo
"""

from configs import common
from mipo_jax.losses import loss_config


def get_config(arg=None):
    arg = common.parse_arg(arg, tiny=False)
    loss = loss_config("reference")
    loss.alpha = 0.1
    loss.links = ("exo_pair",)
    loss.label_smoothing = 1e-3
    return common.make("exo", loss, arg)


def sweep(add):
    for beta in (0.05, 0.1, 0.5):
        add(**{"loss.alpha": beta})
