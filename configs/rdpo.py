"""R-DPO (Park, Rafailov, Ermon, Finn 2024, arXiv 2403.19159; mathematics §2.5).

L = −log σ(β h + α_R(|y_w| − |y_l|)), |y| in tokens: MI-DPO with the length-tilted reference
ζ = π_ref · exp(−α_R |y| / β). The sign follows the derivation from the length-penalised
RLHF objective (mathematics §2.5; third-party code disagrees). The paper's defaults were not
available; SimPO's grid is α_R ∈ {0.05, 0.1, 0.5, 1.0}, β ∈ {0.01, 0.05, 0.1}. Run:

  python -m mipo_jax.main --config=configs/rdpo.py --workdir=/tmp/rdpo
"""

from configs import common
from mipo_jax.losses import loss_config


def get_config(arg=None):
    arg = common.parse_arg(arg, tiny=False, length_coef=0.05)
    loss = loss_config("length_tilted_reference", length_coef=arg.length_coef)
    loss.alpha = 0.1
    return common.make("rdpo", loss, arg)


def sweep(add):
    for coef in (0.05, 0.1, 0.5, 1.0):
        for beta in (0.01, 0.05, 0.1):
            add(**{"loss.prior.length_coef": coef, "loss.alpha": beta})
