"""TIS-DPO (Liu et al. ICLR 2025, arXiv 2410.04350; exlaw/TIS-DPO; spec §2.7).

L = −log σ(β[Σ_t w_t(ℓ^π − ℓ^ref)(y_w) − Σ_t w_t(ℓ^π − ℓ^ref)(y_l)]) with token weights from
two contrastive models, d_t = log π⁺ − log π⁻ (negated on rejected tokens), transformed to
[0.7, 1.3] (``rank_based``, the README command). MI-DPO with the token prior
λ_t = (1 − w_t) ℓ^π_t + w_t ℓ^ref_t. All-ones weights give DPO. Run:

  python -m mipo_jax.main --config=configs/tisdpo.py --workdir=/tmp/tisdpo
"""

from configs import common
from mipo_jax.losses import loss_config


def get_config(arg=None):
    arg = common.parse_arg(arg, tiny=False, transform="rank_based")
    loss = loss_config("token_weighted")
    loss.alpha = 0.1
    return common.make(
        "tisdpo",
        loss,
        arg,
        learning_rate=5e-7,
        token_weights=dict(transform=arg.transform, low=0.7, high=1.3, clamp=1.5),
    )


def sweep(add):
    for transform in ("binary", "rank_based", "threshold_and_scale"):
        add(**{"token_weights.transform": transform})
