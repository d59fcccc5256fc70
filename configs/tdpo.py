"""TDPO (Zeng et al. ICML 2024, arXiv 2404.11999; Vance0124/Token-level-DPO; mathematics §2.6).

TDPO1: −log σ(β[h + SeqKL(y_w) − SeqKL(y_l)]); TDPO2: −log σ(β[h + α_T(sg(SeqKL(y_w)) −
SeqKL(y_l))]), SeqKL the summed forward KL(π_ref ‖ π_θ) per token. MI-DPO with the token
prior λ_t = ℓ^ref_t − c·KL_t. Code defaults: β = 0.1, α_T = 0.5, TDPO2. Run:

  python -m mipo_jax.main --config=configs/tdpo.py:variant=tdpo2 --workdir=/tmp/tdpo
"""

from configs import common
from mipo_jax.losses import loss_config


def get_config(arg=None):
    arg = common.parse_arg(arg, tiny=False, variant="tdpo2")
    if arg.variant == "tdpo1":
        loss = loss_config("sequential_kl", kl_coef=1.0, stop_grad_chosen=False)
    elif arg.variant == "tdpo2":
        loss = loss_config("sequential_kl", kl_coef=0.5, stop_grad_chosen=True)
    else:
        raise ValueError(f"tdpo variant must be 'tdpo1' or 'tdpo2', got {arg.variant!r}")
    loss.alpha = 0.1
    return common.make("tdpo", loss, arg, learning_rate=5e-7)


def sweep(add):
    for alpha_t in (0.1, 0.5, 1.0):
        add(**{"loss.prior.kl_coef": alpha_t})
