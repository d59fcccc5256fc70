"""AOT (Melnyk et al. 2024, arXiv 2406.05882; TRL "aot" / "aot_unpaired").

Distributional alignment by sorting over the batch: paired sorts (S^π_w − S^π_l) and
(S^ref_w − S^ref_l) separately; unpaired sorts ρ_w and ρ_l separately; then a logistic of
β·Δ_sorted. The loss couples the batch, so it is not exact under gradient accumulation. Run:

  python -m mipo_jax.main --config=configs/aot.py:variant=unpaired --workdir=/tmp/aot
"""

from configs import common
from mipo_jax.losses import loss_config


def get_config(arg=None):
    arg = common.parse_arg(arg, tiny=False, variant="paired")
    links = {"paired": "aot", "unpaired": "aot_unpaired"}
    if arg.variant not in links:
        raise ValueError(f"aot variant must be one of {sorted(links)}, got {arg.variant!r}")
    loss = loss_config("reference")
    loss.alpha = 0.1
    loss.links = (links[arg.variant],)
    return common.make("aot", loss, arg)


def sweep(add):
    for beta in (0.01, 0.1):
        add(**{"loss.alpha": beta})
