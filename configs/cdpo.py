"""Conservative DPO (Mitchell 2023, https://ericmitchell.ai/cdpo.pdf, Eq. 3; mathematics §2.10).

L = −(1−ε) log σ(βh) − ε log σ(−βh): DPO's logit with soft labels, the ``cdpo`` link with
``label_smoothing`` ε = 0.1 (TRL 1.16's ``sigmoid`` has no label smoothing).

Run:

  python -m mipo_jax.main --config=configs/cdpo.py --workdir=/tmp/cdpo
"""

from configs import common
from mipo_jax.losses import loss_config


def get_config(arg=None):
    arg = common.parse_arg(arg, tiny=False)
    loss = loss_config("reference")
    loss.alpha = 0.1
    loss.links = ("cdpo",)
    loss.label_smoothing = 0.1
    return common.make("cdpo", loss, arg)


def sweep(add):
    for eps in (0.05, 0.1, 0.2):
        add(**{"loss.label_smoothing": eps})
