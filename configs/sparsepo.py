"""SparsePO (Christopoulou et al. 2024, arXiv 2410.05102; huawei-noah/HEBO; mathematics §2.8).

L = −log σ(β(u − d)) + λ_u(‖m^u_w‖₁ + ‖m^u_l‖₁) + λ_d(‖m^d_w‖₁ + ‖m^d_l‖₁), with token masks
from a small network on every layer of the live reference's hidden states (the original's
``simple_all``; see ``mipo_jax.train.extras.SparseMasks``), trained with the policy. MI-DPO
with the learnable token prior λ_t = (1 − m^u_t) ℓ^π_t + m^u_t ℓ^ref_t − m^d_t KL_t plus the
L1 term. Defaults: β = 0.1 (HH) / 0.8 (IMDB, TL;DR, MBPP), λ = 0 (0.001 for HH
sparse-common), sparse-common, mask weights N(0, 0.02) as the original's nets end up.
Mask dropout: ``SparseConfig.mask_dropout`` is 0.01, but the original trainer's
``disable_dropout=True`` (its default, kept by its configs) runs ``disable_dropout_in_model``
on the policy, which holds the mask nets, so every mask dropout runs at p = 0; 0 here too
(``:tiny`` sets 0.01 to exercise the path). AdamW as the original; its extra weight decay
0.01 on the mask nets' weights (``mask_weight_decay``, lr·wd = 5e-9 a step) is left out. Run:

  python -m mipo_jax.main --config=configs/sparsepo.py:independent --workdir=/tmp/sparsepo
"""

from configs import common
from mipo_jax.losses import loss_config


def get_config(arg=None):
    arg = common.parse_arg(arg, tiny=False, independent=False)
    loss = loss_config("sparse_masks")
    loss.alpha = 0.1
    config = common.make(
        "sparsepo",
        loss,
        arg,
        optimizer="adamw",  # configs/config_po.yaml: adamw_torch, lr 5e-7, cosine
        learning_rate=5e-7,
        # dropout after each ReLU of the net; init_std: its Linear weights' N(0, σ)
        mask_net=dict(independent=arg.independent, dropout=0.0, init_std=0.02),
    )
    if arg.tiny:
        config.mask_net.dropout = 0.01
        # with 2 layers a net whose 2 mixer weights are both < 0 (chance 1/4) gives masks
        # that are 0 everywhere, forever; this seed's nets start alive
        config.seed = 3
    return config


def sweep(add):
    for l1 in (0.0, 0.001, 0.01):
        add(**{"loss.l1_mask_u": l1, "loss.l1_mask_d": l1})
