"""LD-DPO (Liu et al. 2024, arXiv 2409.06411; TRL HEAD ``ld_alpha``; mathematics §2.24).

Tokens past l_p = min(|y_w|, |y_l|) count with weight a ∈ [0, 1] in both the policy and the
reference log-probs (TRL HEAD; v0.19 desensitised the policy only). MI-DPO with the token
prior λ_t = c_t ℓ^ref_t + (1 − c_t) ℓ^π_t. The paper's default a was not available; TRL's
docs suggest values in [0, 1], we use 0.5. Run:

  python -m mipo_jax.main --config=configs/lddpo.py:ld_alpha=0.3 --workdir=/tmp/lddpo
"""

from configs import common
from mipo_jax.losses import loss_config


def get_config(arg=None):
    arg = common.parse_arg(arg, tiny=False, ld_alpha=0.5)
    loss = loss_config("length_desensitized", ld_alpha=arg.ld_alpha)
    loss.alpha = 0.1
    return common.make("lddpo", loss, arg)


def sweep(add):
    for a in (0.1, 0.3, 0.5, 0.7, 1.0):
        add(**{"loss.prior.ld_alpha": a})
