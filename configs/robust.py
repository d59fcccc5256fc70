"""Robust DPO (Chowdhury et al. 2024, arXiv 2403.00409; TRL "robust"; mathematics §2.10).

L = [−(1−ε) log σ(βh) + ε log σ(−βh)] / (1 − 2ε), an unbiased loss under label flips with
rate ε (0.1 suggested).

Run:

  python -m mipo_jax.main --config=configs/robust.py --workdir=/tmp/robust
"""

from configs import common
from mipo_jax.losses import loss_config


def get_config(arg=None):
    arg = common.parse_arg(arg, tiny=False)
    loss = loss_config("reference")
    loss.alpha = 0.1
    loss.links = ("robust",)
    loss.label_smoothing = 0.1
    return common.make("robust", loss, arg)


def sweep(add):
    for eps in (0.05, 0.1, 0.2):
        add(**{"loss.label_smoothing": eps})
