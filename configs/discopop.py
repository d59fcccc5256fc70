"""DiscoPOP (Chris Lu et al. 2024, arXiv 2406.08414; TRL "discopop"; mathematics §2.12).

(1 − σ(z/τ))(−log σ(z)) + σ(z/τ) e^{−z} with z = βh, τ = 0.05.

Run:

  python -m mipo_jax.main --config=configs/discopop.py --workdir=/tmp/discopop
"""

from configs import common
from mipo_jax.losses import loss_config


def get_config(arg=None):
    arg = common.parse_arg(arg, tiny=False)
    loss = loss_config("reference")
    loss.alpha = 0.1
    loss.links = ("discopop",)
    loss.discopop_tau = 0.05
    return common.make("discopop", loss, arg)


def sweep(add):
    for tau in (0.01, 0.05, 0.1):
        add(**{"loss.discopop_tau": tau})
