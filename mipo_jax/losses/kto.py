"""KTO (Ethayarajh et al. 2024, arXiv 2402.01306, Eq. 8; trl@f2cd577 ``kto_trainer.py``).

Unpaired examples (x, y, label). With r = log π_θ(y|x) − log π_ref(y|x) and the reference
point z_0 = max(0, mean over the batch of log π_θ/π_ref on *mismatched* (x, y') pairs),
detached:
  desirable:   λ_D (1 − σ(β(r − z_0)))
  undesirable: λ_U (1 − σ(β(z_0 − r)))
averaged over all examples (TRL: ``cat(...).nanmean()``). ``loss_type='apo_zero_unpaired'``
gives APO-zero's unpaired form, 1 − σ(βr) and σ(βr). Not MI-DPO (spec §2.14): there is no
pairwise logistic. z_0 is a batch statistic, so gradient accumulation is not exact for KTO.
"""

import jax
import jax.numpy as jnp
import ml_collections
from flax import struct
from jaxtyping import Array, Float

from mipo_jax.metrics import Metric, weighted_mean
from mipo_jax.types import compute_dtype


@struct.dataclass
class UnpairedInputs:
    """Per-token log-probs of unpaired examples ``[N, T]``.

    ``label`` is 1.0 for desirable and 0.0 for undesirable completions. ``kl_*`` are the
    policy and reference log-probs of mismatched completions (TRL shifts completions by one
    within the batch), with their own mask. A reference may be sequence-level ``[N]``.
    """

    policy: Float[Array, "N T"]
    mask: Float[Array, "N T"]
    reference: Array
    label: Float[Array, " N"]
    kl_policy: Array
    kl_reference: Array
    kl_mask: Float[Array, "N T"]
    valid: Float[Array, " N"] | None = None


def kto_config() -> ml_collections.ConfigDict:
    """TRL defaults: β = 0.1, λ_D = λ_U = 1."""
    return ml_collections.ConfigDict(
        dict(beta=0.1, desirable_weight=1.0, undesirable_weight=1.0, loss_type="kto")
    )


def _seq(x, mask):
    return jnp.sum(x * mask, axis=-1) if x.ndim == 2 else x


def kto_loss(inputs: UnpairedInputs, cfg) -> tuple[jax.Array, dict[str, Metric]]:
    if cfg.loss_type not in ("kto", "apo_zero_unpaired"):
        raise ValueError(f"kto.loss_type={cfg.loss_type!r}; choose kto or apo_zero_unpaired")
    dtype = compute_dtype(inputs.policy)
    mask = inputs.mask.astype(dtype)
    valid = jnp.ones(mask.shape[:1], dtype) if inputs.valid is None else inputs.valid.astype(dtype)
    valid = valid * (jnp.sum(mask, axis=-1) > 0)
    pol = _seq(inputs.policy.astype(dtype), mask)
    r = pol - _seq(inputs.reference.astype(dtype), mask)
    kl_mask = inputs.kl_mask.astype(dtype)
    kl_r = _seq(inputs.kl_policy.astype(dtype), kl_mask) - _seq(
        inputs.kl_reference.astype(dtype), kl_mask
    )
    z0 = jax.lax.stop_gradient(
        jnp.maximum(jnp.sum(kl_r * valid) / jnp.maximum(jnp.sum(valid), 1), 0)
    )
    desirable = inputs.label.astype(dtype)
    beta = cfg.beta
    if cfg.loss_type == "kto":
        good, bad = 1 - jax.nn.sigmoid(beta * (r - z0)), 1 - jax.nn.sigmoid(beta * (z0 - r))
    else:
        good, bad = 1 - jax.nn.sigmoid(beta * r), jax.nn.sigmoid(beta * r)
    per_example = desirable * cfg.desirable_weight * good + (1 - desirable) * (
        cfg.undesirable_weight * bad
    )
    loss = jnp.sum(per_example * valid) / jnp.maximum(jnp.sum(valid), 1.0)
    rewards = jax.lax.stop_gradient(beta * r)
    logps = jax.lax.stop_gradient(pol)
    metrics = {
        "loss": Metric(loss, jnp.ones((), dtype)),
        "rewards/chosen": weighted_mean(rewards, valid * desirable),
        "rewards/rejected": weighted_mean(rewards, valid * (1 - desirable)),
        "logps/chosen": weighted_mean(logps, valid * desirable),
        "logps/rejected": weighted_mean(logps, valid * (1 - desirable)),
        "kl": Metric(z0, jnp.ones((), dtype)),
    }
    return loss, metrics
