"""APO (D'Oosterlinck et al. 2024, arXiv 2408.06266; TRL "apo_zero" / "apo_down").

apo_zero: (1 − σ(r_w)) + σ(r_l); apo_down: σ(r_w) + (1 − σ(r_w − r_l)), r = β log π/π_ref.
Pointwise links on MI-DPO's implicit reward with ζ = π_ref. Run:

  python -m mipo_jax.main --config=configs/apo.py:variant=down --workdir=/tmp/apo
"""

from configs import common
from mipo_jax.losses import loss_config


def get_config(arg=None):
    arg = common.parse_arg(arg, tiny=False, variant="zero")
    if arg.variant not in ("zero", "down"):
        raise ValueError(f"apo variant must be 'zero' or 'down', got {arg.variant!r}")
    loss = loss_config("reference")
    loss.alpha = 0.1
    loss.links = (f"apo_{arg.variant}",)
    return common.make("apo", loss, arg)


def sweep(add):
    for beta in (0.05, 0.1):
        add(**{"loss.alpha": beta})
