"""MI-DPO with a learnable prior (mathematics §1.2, §1.5): ours; no other framework has it.

The prior ζ_φ(y) is a small prompt-free language model trained jointly with π: the MI-DPO
loss trains both, and the mutual-information term −E_{y∼π} log ζ_φ(y) (weight ``mi_weight``)
pins ζ_φ to the policy's response marginal p_π, which makes the joint problem well posed
(E_x KL(π‖ζ) = I_π(X;Y) + KL(p_π‖ζ)). Run:

  python -m mipo_jax.main --config=configs/mipo_learned.py --workdir=/tmp/mipo
"""

from configs import common
from mipo_jax.losses import loss_config


def get_config(arg=None):
    arg = common.parse_arg(arg, tiny=False, mi_weight=1.0)
    loss = loss_config("learned")
    loss.alpha = 0.1
    loss.mi_weight = arg.mi_weight
    return common.make(
        "mipo_learned", loss, arg, prior_model=dict(num_layers=1, samples_per_step=8)
    )


def sweep(add):
    for w in (0.0, 0.1, 1.0, 10.0):
        add(**{"loss.mi_weight": w})
