"""SimPO (Meng, Xia, Chen 2024, arXiv 2405.14734, Eq. 6; princeton-nlp/SimPO).

L = −log σ((β/|y_w|) S^π_w − (β/|y_l|) S^π_l − γ), no reference. Mapping (i) (default):
MI-DPO on the length-normalised policy (``normalize='mean'``) with a uniform prior and
margin γ. Mapping (ii) (``:mapping=ii``): summed MI-DPO with the θ-dependent,
label-dependent prior log ζ = (1 − 1/|y|) S^π ± γ/(2β). Code defaults: β = 2.0,
γ/β = 0.25 (γ = 0.5), batch 128, Adam lr 3e-7 (Mistral-Base; see the paper's Table 8). Run:

  python -m mipo_jax.main --config=configs/simpo.py --workdir=/tmp/simpo
"""

from configs import common
from mipo_jax.losses import loss_config


def get_config(arg=None):
    arg = common.parse_arg(arg, tiny=False, mapping="i")
    if arg.mapping not in ("i", "ii"):
        raise ValueError(f"simpo mapping must be 'i' or 'ii', got {arg.mapping!r}")
    config = common.make(
        "simpo",
        loss_config("uniform"),
        arg,
        optimizer="adamw",
        learning_rate=3e-7,
        batch_size=128,
        gamma_beta_ratio=0.25,
    )
    if arg.mapping == "i":
        config.loss.normalize = "mean"
        config.loss.alpha = 2.0
        config.loss.margin = config.loss.get_ref("alpha") * config.get_ref("gamma_beta_ratio")
    else:
        config.loss = loss_config("simpo", gamma=0.5)
        config.loss.alpha = 2.0
        config.loss.prior.gamma = config.loss.get_ref("alpha") * config.get_ref("gamma_beta_ratio")
    return config


def sweep(add):
    for beta in (2.0, 2.5):
        for ratio in (0.25, 0.5):
            add(**{"loss.alpha": beta, "gamma_beta_ratio": ratio})
