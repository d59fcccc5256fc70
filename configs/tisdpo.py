"""TIS-DPO (Liu et al. ICLR 2025, arXiv 2410.04350; exlaw/TIS-DPO; mathematics §2.7).

L = −log σ(β[Σ_t w_t(ℓ^π − ℓ^ref)(y_w) − Σ_t w_t(ℓ^π − ℓ^ref)(y_l)]) with token weights from
two contrastive models, d_t = log π⁺ − log π⁻ (negated on rejected tokens), transformed to
[0.7, 1.3] (``rank_based``, the README command). MI-DPO with the token prior
λ_t = (1 − w_t) ℓ^π_t + w_t ℓ^ref_t. All-ones weights give DPO.

The run first builds π⁺ and π⁻ from the reference (`mipo_jax.train.token_weights`), cached
on disk by a content hash: ``source=dpo`` is TIS-DPO(D), the paper's best (π⁺ by DPO, π⁻ by
DPO on the swapped pairs, one epoch each with the main run's β and optimiser, as the original
README does); ``source=sft`` is TIS-DPO(S) (SFT on the chosen / the rejected responses);
``source=folders`` reads ``token_weights.positive/.negative``. Run:

  python -m mipo_jax.main --config=configs/tisdpo.py --workdir=/tmp/tisdpo
  python -m mipo_jax.main --config=configs/tisdpo.py:source=sft --workdir=/tmp/tisdpo_s
"""

from configs import common
from mipo_jax.losses import loss_config


def get_config(arg=None):
    arg = common.parse_arg(arg, tiny=False, transform="rank_based", source="dpo")
    loss = loss_config("token_weighted")
    loss.alpha = 0.1
    config = common.make(
        "tisdpo",
        loss,
        arg,
        learning_rate=5e-7,
        token_weights=dict(
            transform=arg.transform,  # binary (= DPO) | rank_based | threshold_and_scale
            low=0.7,
            high=1.3,
            clamp=1.5,  # threshold_and_scale: |d| clamped here, then mapped to [low, high]
            source=arg.source,  # dpo (TIS-DPO(D)) | sft (TIS-DPO(S)) | folders
            positive="",  # source=folders: HF folders of π⁺ and π⁻
            negative="",
            steps=0,  # dpo/sft: training steps of each contrastive model; 0 = one epoch
            learning_rate=0.0,  # 0 = optim.learning_rate (the original uses the same)
            beta=0.0,  # dpo: β of the contrastive DPO runs; 0 = loss.alpha
            cache_dir="",  # "" = $MIPO_JAX_CACHE/tisdpo (default ~/.cache/mipo_jax/tisdpo)
        ),
    )
    if arg.tiny:  # two steps of each contrastive run, fast enough to move a tiny model
        config.token_weights.update(dict(steps=2, learning_rate=1e-3))
    return config


def sweep(add):
    for transform in ("binary", "rank_based", "threshold_and_scale"):
        add(**{"token_weights.transform": transform})
    for source in ("dpo", "sft"):
        add(**{"token_weights.source": source})
