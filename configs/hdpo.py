"""H-DPO, "Entropy Controllable DPO" (Omura et al. 2024, arXiv 2411.07595; mathematics §2.3).

L = −log σ(β(a S^π_w − S^ref_w) − β(a S^π_l − S^ref_l)), MI-DPO with ζ = π_ref^{1/a} and
α = a·β. a < 1 sharpens the policy (lower entropy); a = 1 is DPO. ``loss.alpha`` follows
``hdpo_beta`` and ``loss.prior.temperature`` (field references), so overriding either keeps
the mapping exact. Run (a = 0.9):

  python -m mipo_jax.main --config=configs/hdpo.py:a=0.9 --workdir=/tmp/hdpo
"""

from configs import common
from mipo_jax.losses import loss_config


def get_config(arg=None):
    arg = common.parse_arg(arg, tiny=False, a=0.95)
    loss = loss_config("tempered_reference", temperature=arg.a)
    config = common.make("hdpo", loss, arg, hdpo_beta=0.1)
    config.loss.alpha = config.get_ref("hdpo_beta") * config.loss.prior.get_ref("temperature")
    return config


def sweep(add):
    for a in (0.5, 0.7, 0.9, 1.0, 1.2):
        add(**{"loss.prior.temperature": a})
