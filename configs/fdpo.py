"""f-DPO (Wang et al. 2023, arXiv 2309.16240; TRL HEAD ``f_divergence_type``; spec §2.12).

DPO with the log-ratio ρ replaced by a score g(ρ): forward_kl −e^{−ρ}, js_divergence log σ(ρ),
alpha_divergence (e^{(a−1)ρ} − 1)/(a − 1) with TRL HEAD's a = 0.5. Only reverse_kl is MI-DPO
proper. Run:

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
