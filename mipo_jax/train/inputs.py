"""What the losses read, computed from the models and a step batch.

* paired objectives: `token_inputs` fills the `TokenInputs` fields the configured loss
  declares (``spec.fields``): the policy's per-token log-probs, the reference's (live model
  or the batch's cached ``ref_logps``), the per-token KL and log Σπ² over the vocabulary,
  TIS-DPO's weights, SparsePO's masks (a net over every reference layer) and the learnable
  prior's scores;
* ``unpaired`` (KTO): `unpaired_inputs`, one completion per slot, and `kto_kl_sums` over
  the batch's mismatched rows (the reference point z_0);
* ``sft``: `sft_logps`, the policy's log-probs of the one completion per slot.

``spec`` is the step's `mipo_jax.train.step.StepSpec`.
"""

import jax
import jax.numpy as jnp
from flax import nnx

from mipo_jax.losses import kto
from mipo_jax.losses.kto import UnpairedInputs
from mipo_jax.losses.logps import chunked_token_logps, chunked_token_stats
from mipo_jax.metrics import Metric
from mipo_jax.train.scoring import hidden_at_slots, pairs, rows
from mipo_jax.types import TokenInputs


def _reference(spec, ref_params, batch, all_layers: bool = False):
    """(hidden at slots, unembedding, every layer's hidden at slots or None) of the live
    reference, all without gradient."""
    ref = nnx.merge(spec.ref_graph, ref_params)
    h = hidden_at_slots(ref, batch, span=spec.attention_span, all_layers=all_layers)
    h, layers = (h[-1], h) if all_layers else (h, None)
    sg = jax.lax.stop_gradient
    return sg(h), sg(ref.unembed_weight()), None if layers is None else sg(layers)


def token_inputs(params, ref_params, batch, rng, spec) -> tuple[TokenInputs, jax.Array]:
    """Run the models over the batch; the ``TokenInputs`` the loss reads, and the policy's
    mean logit (over the vocabulary) at every slot ``[G·P, 2, C]`` (TRL's ``logits/*``)."""
    fields = spec.fields
    policy = nnx.merge(spec.graph("policy"), params["policy"])
    h, w = hidden_at_slots(policy, batch, span=spec.attention_span), policy.unembed_weight()
    targets = pairs(batch["targets"])
    live = spec.ref_graph is not None
    need_masks = "mask_u" in fields
    ref_h, ref_w, ref_layers = (
        _reference(spec, ref_params, batch, need_masks) if live else (None,) * 3
    )
    need_kl = "kl" in fields
    stats = chunked_token_stats(
        h,
        w,
        targets,
        logsumsq="logsumsq" in fields,
        ref_h=ref_h if need_kl else None,
        ref_w=ref_w if need_kl else None,
        chunk_size=spec.chunk_size,
    )
    mask = pairs(batch["mask"]).astype(jnp.float32)
    extra = {}
    if "reference" in fields:
        if "ref_logps" in batch:
            extra["reference"] = pairs(batch["ref_logps"])
        else:
            lp = chunked_token_logps(ref_h, ref_w, targets, chunk_size=spec.chunk_size)
            extra["reference"] = jax.lax.stop_gradient(lp)
    if need_kl:
        extra["kl"] = stats.kl
    if "logsumsq" in fields:
        extra["logsumsq"] = stats.logsumsq
    if "token_weights" in fields:
        extra["token_weights"] = pairs(batch["token_weights"])
    if need_masks:  # the net reads layers 1..L (HEBO SparsePO's `reference_states[1:]`)
        net = nnx.merge(spec.graph("mask_net"), params["mask_net"])
        extra["mask_u"], mask_d = net(ref_layers[1:], rng, spec.mask_dropout)
        if mask_d is not None:
            extra["mask_d"] = mask_d
    if "prior" in fields:
        extra.update(_learned_prior(params, batch, spec, targets, mask))
    valid = batch["pair_valid"].reshape(-1)
    inputs = TokenInputs(policy=stats.logps, mask=mask, pair_valid=valid, **extra)
    return inputs, mean_logits(h, w)


def mean_logits(h: jax.Array, w: jax.Array) -> jax.Array:
    """Mean over the vocabulary of each slot's logits, ``h · mean_v(w[:, v])`` (exact, and
    without the ``[..., V]`` logits), in float32 and without gradient."""
    w_mean = jnp.mean(w.astype(jnp.float32), axis=1)
    return jax.lax.stop_gradient(jnp.einsum("...d,d->...", h.astype(jnp.float32), w_mean))


def prior_logps(prior, y: jax.Array, mask: jax.Array, bos_id: int, chunk_size: int) -> jax.Array:
    """log ζ_φ(y_t | y_<t) of the learnable prior per completion token ``[N, C]``, 0 off
    ``mask``. Prompt-free: the completion is fed as ``[bos, y_0, ..., y_{C-2}]``."""
    shape = y.shape
    y = y.reshape(-1, shape[-1])
    inp = jnp.concatenate([jnp.full((y.shape[0], 1), bos_id, y.dtype), y[:, :-1]], -1)
    h = prior.hidden(inp)
    lp = chunked_token_logps(h, prior.unembed_weight(), y, chunk_size=chunk_size)
    return lp.reshape(shape) * mask


def _learned_prior(params, batch, spec, targets, mask) -> dict:
    """log ζ_φ on the batch's completions and, for the MI term, on policy samples."""
    prior = nnx.merge(spec.graph("prior"), params["prior"])
    out = {"prior": prior_logps(prior, targets, mask, spec.bos_id, spec.chunk_size)}
    if "samples" in batch:
        s, s_mask = rows(batch["samples"]), rows(batch["samples_mask"]).astype(jnp.float32)
        out["prior_samples"] = prior_logps(prior, s, s_mask, spec.bos_id, spec.chunk_size)
        out["prior_samples_mask"] = s_mask
    return out


# ---- one completion per slot: SFT and KTO ----------------------------------------------


def sft_logps(params, batch, spec) -> jax.Array:
    """The policy's per-token log-probs of each slot's one completion ``[G·P, 1, C]``."""
    policy = nnx.merge(spec.graph("policy"), params["policy"])
    h = hidden_at_slots(policy, batch, span=spec.attention_span)
    y = pairs(batch["targets"])
    return chunked_token_logps(h, policy.unembed_weight(), y, chunk_size=spec.chunk_size)


def _unpaired_logps(model, w, batch, prefix: str, spec) -> jax.Array:
    """Per-token log-probs ``[N, C]`` of the rows named by ``prefix`` (side axis of size 1)."""
    h = hidden_at_slots(model, batch, prefix)[:, 0]
    y = pairs(batch[prefix + "targets"])[:, 0]
    return chunked_token_logps(h, w, y, chunk_size=spec.chunk_size)


def _unpaired_reference(ref_params, batch, spec, prefix: str) -> jax.Array:
    """Reference log-probs of the ``prefix`` rows: cached with the batch, or the live model."""
    key = "kl_ref_logps" if prefix == "kl_" else "ref_logps"
    if key in batch:
        return pairs(batch[key])[:, 0]
    ref = nnx.merge(spec.ref_graph, ref_params)
    return _unpaired_logps(ref, ref.unembed_weight(), batch, prefix, spec)


def kto_kl_sums(params, ref_params, batch, spec) -> Metric:
    """KTO: Σ valid·log π/π_ref over the batch's ``kl_*`` rows (each prompt with another
    example's completion, TRL's mismatched pairs) and Σ valid. Forward only, detached."""
    policy = nnx.merge(spec.graph("policy"), params["policy"])
    sg = jax.lax.stop_gradient
    valid = kto.example_valid(pairs(batch["mask"])[:, 0], batch["pair_valid"].reshape(-1))
    return kto.mismatched_kl(
        sg(_unpaired_logps(policy, policy.unembed_weight(), batch, "kl_", spec)),
        sg(_unpaired_reference(ref_params, batch, spec, "kl_")),
        pairs(batch["kl_mask"])[:, 0].astype(jnp.float32),
        valid,
    )


def unpaired_inputs(params, ref_params, batch, spec) -> UnpairedInputs:
    """KTO: one completion per slot (side axis of size 1). The mismatched rows are not run
    here: the step computes z_0 from them first (`kto_kl_sums`) and passes it on."""
    policy = nnx.merge(spec.graph("policy"), params["policy"])
    return UnpairedInputs(
        policy=_unpaired_logps(policy, policy.unembed_weight(), batch, "", spec),
        mask=pairs(batch["mask"])[:, 0].astype(jnp.float32),
        reference=jax.lax.stop_gradient(_unpaired_reference(ref_params, batch, spec, "")),
        label=batch["label"].reshape(-1).astype(jnp.float32),
        valid=batch["pair_valid"].reshape(-1),
    )
