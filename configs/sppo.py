"""SPPO-hard (Wu et al. 2024, arXiv 2405.00675; TRL "sppo_hard"; mathematics §2.12).

(ρ_w − 1/(2β))² + (ρ_l + 1/(2β))², ρ = log π/π_ref.

Run:

  python -m mipo_jax.main --config=configs/sppo.py --workdir=/tmp/sppo
"""

from configs import common
from mipo_jax.losses import loss_config


def get_config(arg=None):
    arg = common.parse_arg(arg, tiny=False)
    loss = loss_config("reference")
    loss.alpha = 0.1
    loss.links = ("sppo_hard",)
    return common.make("sppo", loss, arg)


def sweep(add):
    for beta in (0.01, 0.1, 1.0):
        add(**{"loss.alpha": beta})
