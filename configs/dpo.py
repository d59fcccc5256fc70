"""DPO (Rafailov et al. 2023, arXiv 2305.18290, Eq. 7): MI-DPO with ζ = π_ref.

Defaults of the paper (App. B): β = 0.1 (0.5 for TL;DR), RMSprop, lr 1e-6 with 150 warm-up
steps, batch 64, summed log-probs. Run:

  python -m mipo_jax.main --config=configs/dpo.py --workdir=/tmp/dpo
"""

from configs import common
from mipo_jax.losses import loss_config


def get_config(arg=None):
    arg = common.parse_arg(arg, tiny=False)
    loss = loss_config("reference")
    loss.alpha = 0.1
    return common.make("dpo", loss, arg)


def sweep(add):
    for beta in (0.01, 0.05, 0.1, 0.5):
        add(**{"loss.alpha": beta})
