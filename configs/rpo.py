"""RPO (Pang et al. 2024, arXiv 2404.19733; TRL ``loss_type=["sigmoid", "sft"]``).

DPO plus α_RPO·NLL of the chosen response (token mean over the batch, as TRL); α_RPO = 1.

Run:

  python -m mipo_jax.main --config=configs/rpo.py --workdir=/tmp/rpo
"""

from configs import common
from mipo_jax.losses import loss_config


def get_config(arg=None):
    arg = common.parse_arg(arg, tiny=False)
    loss = loss_config("reference")
    loss.alpha = 0.1
    loss.sft_weight = 1.0
    return common.make("rpo", loss, arg)


def sweep(add):
    for w in (0.5, 1.0):
        add(**{"loss.sft_weight": w})
