"""KTO (Ethayarajh et al. 2024, arXiv 2402.01306, Eq. 8; trl@f2cd577 ``kto_trainer.py``).

Unpaired examples (x, y, label). With r = log π_θ(y|x) − log π_ref(y|x) and the reference
point z_0 = max(0, mean over the batch of log π_θ/π_ref on *mismatched* (x, y') pairs),
detached:
  desirable:   λ_D (1 − σ(β(r − z_0)))
  undesirable: λ_U (1 − σ(β(z_0 − r)))
averaged over all examples (TRL: ``cat(...).nanmean()``). ``loss_type='apo_zero_unpaired'``
gives APO-zero's unpaired form, 1 − σ(βr) and σ(βr). Not MI-DPO (mathematics §2.14): there is no
pairwise logistic.

Which batch z_0 averages over. TRL (``kto_trainer.py``, ``kto_loss``) takes the mean over each
device's micro-batch, gathers those means across processes and averages them
(``gather_for_metrics(kl).mean().clamp(min=0)``): under gradient accumulation every micro-batch
gets its own z_0, so accumulated KTO there is not the large-batch loss. Here z_0 is always the
estimate of the whole optimiser-step batch (all devices, all micro-batches, weighted by
example): the train step runs a forward-only pass over the micro-batches' mismatched rows
first and hands the global z_0 to every loss pass (``normalizers``), so loss, gradients and
metrics equal one large batch. With one micro-batch and equal per-device counts this is
TRL's value. ``apo_zero_unpaired`` reads no z_0: the step then skips the mismatched rows and
reports ``kl`` = 0, as TRL does (``calculate_KL=False``). The mismatched pairs change with
every batch, so their reference log-probs come from a live reference only.
"""

from collections.abc import Mapping

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
    kl_policy: Array | None = None  # the mismatched rows: not needed when z_0 is given
    kl_reference: Array | None = None
    kl_mask: Float[Array, "N T"] | None = None
    valid: Float[Array, " N"] | None = None


def kto_config() -> ml_collections.ConfigDict:
    """TRL defaults: β = 0.1, λ_D = λ_U = 1."""
    return ml_collections.ConfigDict(
        dict(beta=0.1, desirable_weight=1.0, undesirable_weight=1.0, loss_type="kto")
    )


def _seq(x, mask):
    return jnp.sum(x * mask, axis=-1) if x.ndim == 2 else x


def example_valid(mask, valid) -> jax.Array:
    """``[N]`` 1.0 for real examples with at least one completion token."""
    ones = jnp.ones(mask.shape[:1], mask.dtype)
    v = ones if valid is None else valid.astype(mask.dtype)
    return v * (jnp.sum(mask, axis=-1) > 0)


def mismatched_kl(kl_policy, kl_reference, kl_mask, valid) -> Metric:
    """Σ valid·log π/π_ref over the mismatched rows and Σ valid: z_0 before its clamp."""
    dtype = compute_dtype(kl_policy)
    m = kl_mask.astype(dtype)
    kl_r = _seq(kl_policy.astype(dtype), m) - _seq(kl_reference.astype(dtype), m)
    valid = valid.astype(dtype)
    return Metric(jnp.sum(kl_r * valid), jnp.sum(valid))


def reference_point(kl: Metric) -> jax.Array:
    """z_0 = max(0, mean KL estimate), detached."""
    return jax.lax.stop_gradient(jnp.maximum(kl.total / jnp.maximum(kl.count, 1), 0))


def kto_loss(
    inputs: UnpairedInputs, cfg, *, normalizers: Mapping[str, jax.Array] | None = None
) -> tuple[jax.Array, dict[str, Metric]]:
    """KTO's loss and metrics (TRL names; ``kl`` is z_0).

    ``normalizers`` (gradient accumulation): ``examples``, the whole batch's count of valid
    examples, and ``z0``, the whole batch's reference point (`reference_point`). With them
    the micro-batches' losses and metrics add up to the large batch's; without them this
    batch's own count and z_0 (from its ``kl_*`` rows) are used.
    """
    if cfg.loss_type not in ("kto", "apo_zero_unpaired"):
        raise ValueError(f"kto.loss_type={cfg.loss_type!r}; choose kto or apo_zero_unpaired")
    dtype = compute_dtype(inputs.policy)
    mask = inputs.mask.astype(dtype)
    valid = example_valid(mask, inputs.valid)
    pol = _seq(inputs.policy.astype(dtype), mask)
    r = pol - _seq(inputs.reference.astype(dtype), mask)
    norm = dict(normalizers or {})
    if "z0" in norm:
        z0 = jax.lax.stop_gradient(norm["z0"].astype(dtype))
    elif inputs.kl_policy is None:
        raise ValueError("kto_loss needs the mismatched rows (kl_policy, ...) or normalizers['z0']")
    else:
        kl = mismatched_kl(inputs.kl_policy, inputs.kl_reference, inputs.kl_mask, valid)
        z0 = reference_point(kl)
    desirable = inputs.label.astype(dtype)
    beta = cfg.beta
    if cfg.loss_type == "kto":
        good, bad = 1 - jax.nn.sigmoid(beta * (r - z0)), 1 - jax.nn.sigmoid(beta * (z0 - r))
    else:
        good, bad = 1 - jax.nn.sigmoid(beta * r), jax.nn.sigmoid(beta * r)
    per_example = desirable * cfg.desirable_weight * good + (1 - desirable) * (
        cfg.undesirable_weight * bad
    )
    examples = norm.get("examples", jnp.sum(valid))
    loss = jnp.sum(per_example * valid) / jnp.maximum(examples, 1.0)
    # this batch's share of the examples: the shares of the micro-batches sum to 1
    share = jnp.sum(valid) / jnp.maximum(examples, 1.0) if normalizers else jnp.ones((), dtype)
    rewards = jax.lax.stop_gradient(beta * r)
    logps = jax.lax.stop_gradient(pol)
    metrics = {
        "loss": Metric(loss, share),
        "rewards/chosen": weighted_mean(rewards, valid * desirable),
        "rewards/rejected": weighted_mean(rewards, valid * (1 - desirable)),
        "logps/chosen": weighted_mean(logps, valid * desirable),
        "logps/rejected": weighted_mean(logps, valid * (1 - desirable)),
        # z_0 per valid example: integer counts add up exactly across micro-batches
        "kl": Metric(z0 * jnp.sum(valid), jnp.sum(valid)),
    }
    return loss, metrics
