"""f-DPO (Wang et al. 2023, arXiv 2309.16240; TRL 1.16 ``f_divergence_type``; mathematics §2.12).

DPO with the log-ratio ρ replaced by a score g(ρ), TRL's (g(0) = 0): forward_kl 1 − e^{−ρ},
js_divergence log 2 + log σ(ρ), alpha_divergence (e^{(a−1)ρ} − 1)/(a − 1) with TRL's a = 0.5.
Scores apply to the links on the chosen-minus-rejected difference only (sigmoid, cdpo, hinge,
ipo, exo_pair, robust, discopop), as in TRL. Only reverse_kl is MI-DPO proper. Run:

  python -m mipo_jax.main --config=configs/fdpo.py:divergence=js_divergence --workdir=/tmp/f
"""

from configs import common
from mipo_jax.losses import loss_config


def get_config(arg=None):
    arg = common.parse_arg(arg, tiny=False, divergence="alpha_divergence")
    loss = loss_config("reference")
    loss.alpha = 0.1
    loss.f_divergence = arg.divergence
    loss.f_alpha = 0.5
    return common.make("fdpo", loss, arg)


def sweep(add):
    for divergence in ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence"):
        add(**{"loss.f_divergence": divergence})
