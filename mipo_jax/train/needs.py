"""What a config's algorithm needs from the trainer, derived once from the config.

* `loss_fields`: the ``TokenInputs`` fields the loss reads;
* `reference_use`: whether the run needs a reference at all, and whether only a live model
  can give what the loss reads (per-token KL and SparsePO's masks read the whole reference
  distribution or its hidden states; a cache holds log-probs only);
* `extra_modules`: the modules trained next to the policy (SparsePO's mask net, the
  learnable prior).
"""

import re

import jax
import jax.numpy as jnp

from mipo_jax.losses import mipo_loss
from mipo_jax.types import TokenInputs

LIVE_ONLY = ("kl", "mask_u")  # need the live reference model, not just its log-probs


def loss_fields(config) -> frozenset:
    """The ``TokenInputs`` fields of the paired loss (none for the other objectives)."""
    if config.objective != "paired":
        return frozenset()
    return required_fields(config.loss)


def needs_reference(config, fields) -> bool:
    """Whether the run reads a reference model's log-probs (live, cached or dataset)."""
    if config.objective == "sft":
        return False
    return config.objective == "unpaired" or bool({"reference", *LIVE_ONLY} & fields)


def live_reference(config, fields) -> bool:
    """Whether the step runs the reference model itself (else log-probs come with batches)."""
    return config.reference.mode == "live" and needs_reference(config, fields)


def extra_modules(config) -> tuple[str, ...]:
    """Names of the modules trained with the policy (params keys besides ``policy``)."""
    if config.objective != "paired":
        return ()
    prior = config.loss.prior.name
    return {"sparse_masks": ("mask_net",), "learned": ("prior",)}.get(prior, ())


_MISSING = re.compile(r"needs TokenInputs field\(s\) \[([^\]]*)\]")
OPTIONAL_FIELDS = ("reference", "kl", "token_weights", "mask_u", "logsumsq", "prior")


def required_fields(loss_cfg) -> frozenset:
    """The ``TokenInputs`` fields ``mipo_loss`` reads under ``loss_cfg``, found by tracing.

    Traces the loss (shapes only) with the fields found so far and adds the ones it asks
    for. ``mask_d`` and the prior samples follow from ``mask_u`` and ``prior``.
    """
    shape = jax.ShapeDtypeStruct((2, 2, 3), jnp.float32)
    fields: set[str] = set()
    for _ in range(len(OPTIONAL_FIELDS) + 1):
        extra = {f: jnp.zeros(shape.shape) for f in fields}
        if "prior" in fields:
            extra.update(prior_samples=jnp.zeros((2, 3)), prior_samples_mask=jnp.ones((2, 3)))
        args = TokenInputs(policy=jnp.zeros(shape.shape), mask=jnp.ones(shape.shape), **extra)
        try:
            jax.eval_shape(lambda a: mipo_loss(a, loss_cfg), args)
            return frozenset(fields)
        except ValueError as err:
            found = _MISSING.search(str(err))
            if not found:
                raise
            names = {n.strip(" '\"") for n in found.group(1).split(",")}
            names -= {"prior_samples", "prior_samples_mask"}
            if not names - fields:
                raise
            fields |= names
    raise RuntimeError(f"could not resolve the loss's inputs: {sorted(fields)}")
