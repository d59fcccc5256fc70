"""BCO, paired form (Jung et al. 2024, arXiv 2404.04656; TRL HEAD "bco_pair").

−log σ(r_w) − log σ(−r_l) (HEAD dropped v0.19's running-mean shift δ).

Run:

  python -m mipo_jax.main --config=configs/bco.py --workdir=/tmp/bco
"""

from configs import common
from mipo_jax.losses import loss_config


def get_config(arg=None):
    arg = common.parse_arg(arg, tiny=False)
    loss = loss_config("reference")
    loss.alpha = 0.1
    loss.links = ("bco_pair",)
    return common.make("bco", loss, arg)


def sweep(add):
    for beta in (0.01, 0.1):
        add(**{"loss.alpha": beta})
