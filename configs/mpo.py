"""MPO, a weighted mixture of losses (TRL docs: ``loss_type=["sigmoid", "bco_pair", "sft"]``,
``loss_weights=[0.8, 0.2, 1.0]``).

Run:

  python -m mipo_jax.main --config=configs/mpo.py --workdir=/tmp/mpo
"""

from configs import common
from mipo_jax.losses import loss_config


def get_config(arg=None):
    arg = common.parse_arg(arg, tiny=False)
    loss = loss_config("reference")
    loss.alpha = 0.1
    loss.links = ("sigmoid", "bco_pair")
    loss.link_weights = (0.8, 0.2)
    loss.sft_weight = 1.0
    return common.make("mpo", loss, arg)


def sweep(add):
    for w in (0.5, 1.0):
        add(**{"loss.sft_weight": w})
