"""DPOP / Smaug (Pal et al. 2024, arXiv 2402.13228; mathematics §2.19).

−log σ(β[h − λ max(0, S^ref_w − S^π_w)]): MI-DPO with a label- and θ-dependent prior that
penalises lowering the chosen likelihood; λ = 50.

Run:

  python -m mipo_jax.main --config=configs/dpop.py --workdir=/tmp/dpop
"""

from configs import common
from mipo_jax.losses import loss_config


def get_config(arg=None):
    arg = common.parse_arg(arg, tiny=False)
    loss = loss_config("dpop", dpop_lambda=50.0)
    loss.alpha = 0.1
    return common.make("dpop", loss, arg)


def sweep(add):
    for lam in (5.0, 50.0, 500.0):
        add(**{"loss.prior.dpop_lambda": lam})
