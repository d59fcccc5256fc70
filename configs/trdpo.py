"""TR-DPO (Gorbatovski et al. 2024, arXiv 2404.09656; TRL ``sync_ref_model``; mathematics §2.28).

DPO whose reference moves: every τ steps θ_ref ← a·θ + (1 − a)·θ_ref (soft, a = 0.6,
τ = 512, TRL's defaults) or a hard copy (a = 1). MI-DPO with a slowly updated prior. Run:

  python -m mipo_jax.main --config=configs/trdpo.py:mode=hard --workdir=/tmp/trdpo
"""

from configs import common
from mipo_jax.losses import loss_config


def get_config(arg=None):
    arg = common.parse_arg(arg, tiny=False, mode="soft")
    if arg.mode not in ("soft", "hard"):
        raise ValueError(f"trdpo mode must be 'soft' or 'hard', got {arg.mode!r}")
    loss = loss_config("reference")
    loss.alpha = 0.1
    mixup = 0.6 if arg.mode == "soft" else 1.0
    return common.make("trdpo", loss, arg, ref_sync=dict(mixup_alpha=mixup, sync_steps=512))


def sweep(add):
    for steps in (64, 512):
        add(**{"ref_sync.sync_steps": steps})
