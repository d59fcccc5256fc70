"""IPO (Azar et al. 2023, arXiv 2310.12036, Eq. 17; mathematics §2.9): L = (h − 1/(2τ))².

TRL (1.16 and v0.19) averages the log-ratios per token before forming h, which the IPO
authors confirmed; τ is TRL's β (0.1). With an f-divergence score, TRL divides the score by
the length (``loss.trl_order=True``, the default). Not MI-DPO proper: MI-DPO's log-ratio with
ζ = π_ref fed to the squared link.

Run:

  python -m mipo_jax.main --config=configs/ipo.py --workdir=/tmp/ipo
"""

from configs import common
from mipo_jax.losses import loss_config


def get_config(arg=None):
    arg = common.parse_arg(arg, tiny=False)
    loss = loss_config("reference")
    loss.alpha = 0.1  # τ
    loss.normalize = "mean"
    loss.links = ("ipo",)
    return common.make("ipo", loss, arg)


def sweep(add):
    for tau in (0.01, 0.1, 0.5, 1.0):
        add(**{"loss.alpha": tau})
