"""SparsePO (Christopoulou et al. 2024, arXiv 2410.05102; huawei-noah/HEBO; spec §2.8).

L = −log σ(β(u − d)) + λ_u(‖m^u_w‖₁ + ‖m^u_l‖₁) + λ_d(‖m^d_w‖₁ + ‖m^d_l‖₁), with token masks
from a small network on the reference's hidden states, trained with the policy. MI-DPO with
the learnable token prior λ_t = (1 − m^u_t) ℓ^π_t + m^u_t ℓ^ref_t − m^d_t KL_t plus the L1
term. Defaults: β = 0.1 (HH) / 0.8 (IMDB, TL;DR), λ = 0 (0.001 for HH sparse-common),
mask dropout 0.01, sparse-common. Run:

  python -m mipo_jax.main --config=configs/sparsepo.py:independent --workdir=/tmp/sparsepo
"""

from configs import common
from mipo_jax.losses import loss_config


def get_config(arg=None):
    arg = common.parse_arg(arg, tiny=False, independent=False)
    loss = loss_config("sparse_masks")
    loss.alpha = 0.1
    return common.make(
        "sparsepo",
        loss,
        arg,
        learning_rate=5e-7,
        mask_net=dict(independent=arg.independent, dropout=0.01),
    )


def sweep(add):
    for l1 in (0.0, 0.001, 0.01):
        add(**{"loss.l1_mask_u": l1, "loss.l1_mask_d": l1})
