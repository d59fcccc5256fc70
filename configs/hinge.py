"""Hinge / SLiC / RSO "hinge-norm" (Liu et al. 2023, arXiv 2309.06657; TRL "hinge").

L = max(0, 1 − βh); β is the inverse margin.

Run:

  python -m mipo_jax.main --config=configs/hinge.py --workdir=/tmp/hinge
"""

from configs import common
from mipo_jax.losses import loss_config


def get_config(arg=None):
    arg = common.parse_arg(arg, tiny=False)
    loss = loss_config("reference")
    loss.alpha = 0.1
    loss.links = ("hinge",)
    return common.make("hinge", loss, arg)


def sweep(add):
    for beta in (0.05, 0.1, 0.5):
        add(**{"loss.alpha": beta})
