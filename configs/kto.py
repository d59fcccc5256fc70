"""KTO (Ethayarajh et al. 2024, arXiv 2402.01306; TRL ``KTOTrainer``; mathematics §2.14).

Unpaired data (``prompt``/``completion``/``label``); prospect-theoretic loss around a batch
reference point z_0. TRL defaults: β = 0.1, λ_D = λ_U = 1 (keep λ_D n_D / (λ_U n_U) in
[1, 3/2]), per-device batch > 1. Not MI-DPO: the ``kto`` section replaces ``loss``'s link.
Run:

  python -m mipo_jax.main --config=configs/kto.py --workdir=/tmp/kto
"""

from configs import common
from mipo_jax.losses import loss_config
from mipo_jax.losses.kto import kto_config


def get_config(arg=None):
    arg = common.parse_arg(arg, tiny=False, loss_type="kto")
    kto = kto_config()
    kto.loss_type = arg.loss_type
    config = common.make("kto", loss_config("reference"), arg, learning_rate=5e-7, kto=kto)
    config.objective = "unpaired"
    config.loss.alpha = config.kto.get_ref("beta")
    return config


def sweep(add):
    for w in (1.0, 1.33):
        add(**{"kto.desirable_weight": w})
