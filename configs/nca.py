"""NCA (Chen et al. 2024, arXiv 2402.05369; TRL "nca_pair"; mathematics §2.12).

Pointwise: −log σ(r_w) − ½ log σ(−r_w) − ½ log σ(−r_l) with r = β log π/π_ref.

Run:

  python -m mipo_jax.main --config=configs/nca.py --workdir=/tmp/nca
"""

from configs import common
from mipo_jax.losses import loss_config


def get_config(arg=None):
    arg = common.parse_arg(arg, tiny=False)
    loss = loss_config("reference")
    loss.alpha = 0.1
    loss.links = ("nca_pair",)
    return common.make("nca", loss, arg)


def sweep(add):
    for beta in (0.01, 0.1):
        add(**{"loss.alpha": beta})
