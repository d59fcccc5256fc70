"""Length-normalised DPO (Tülu 3; TRL "sigmoid_norm"; mathematics §2.12).

−log σ(β(ρ_w/|y_w| − ρ_l/|y_l|)): MI-DPO with ``normalize='mean'`` and ζ = π_ref (the θ-dependent
prior 'length_normalized' with summed scores is the same loss). With an f-divergence score,
TRL divides the score by the length (``loss.trl_order=True``, the default).

Run:

  python -m mipo_jax.main --config=configs/sigmoid_norm.py --workdir=/tmp/sigmoid_norm
"""

from configs import common
from mipo_jax.losses import loss_config


def get_config(arg=None):
    arg = common.parse_arg(arg, tiny=False)
    loss = loss_config("reference")
    loss.alpha = 5.0  # Tülu 3 used β = 5 with normalisation
    loss.normalize = "mean"
    return common.make("sigmoid_norm", loss, arg)


def sweep(add):
    for beta in (1.0, 5.0, 10.0):
        add(**{"loss.alpha": beta})
