"""CPO (Xu et al. 2024, arXiv 2401.08417; TRL experimental CPO "sigmoid"; mathematics §2.16).

L = −log σ(β(S^π_w − S^π_l)) + NLL_w: MI-DPO with a uniform prior plus the NLL term;
β = 0.1, cpo_alpha = 1.

Run:

  python -m mipo_jax.main --config=configs/cpo.py --workdir=/tmp/cpo
"""

from configs import common
from mipo_jax.losses import loss_config


def get_config(arg=None):
    arg = common.parse_arg(arg, tiny=False)
    loss = loss_config("uniform")
    loss.alpha = 0.1
    loss.sft_weight = 1.0
    return common.make("cpo", loss, arg)


def sweep(add):
    for beta in (0.05, 0.1, 0.5):
        add(**{"loss.alpha": beta})
