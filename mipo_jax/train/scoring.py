"""Running one model over step batches: hidden states at completion slots, log-probs.

A step batch (`mipo_jax.train.step_batch`) names, for every completion token, the flat
position of the token that predicts it (``pred_index``). The model runs over all rows of a
group at once; only those positions reach the unembedding, through the chunked log-prob
path (never ``[B, T, V]`` logits). The train step, the evaluation, the reference cache and
the TIS-DPO scores all score models this way; a `Scorer` says how.
"""

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from mipo_jax.losses.logps import chunked_token_logps


@dataclasses.dataclass(frozen=True)
class Scorer:
    """How to score a model (hashable: a static argument of jitted functions).

    Attributes:
      graph: the model's ``GraphDef`` (its parameters are passed separately).
      chunk_size: tokens per chunk of the log-prob path (peak memory ~ chunk × V).
      span: a bound on how far back any token of the rows attends (the longest packed unit;
        None: the row length); blocked attention skips key blocks beyond it.
    """

    graph: Any
    chunk_size: int = 256
    span: int | None = None


def rows(x: jax.Array) -> jax.Array:
    """``[G, K, ...] -> [G·K, ...]``."""
    return x.reshape(-1, *x.shape[2:])


def pairs(x: jax.Array) -> jax.Array:
    """``[G, P, S, C, ...] -> [G·P, S, C, ...]``."""
    return x.reshape(-1, *x.shape[2:])


def hidden_at_slots(
    model, batch, prefix: str = "", span: int | None = None, all_layers: bool = False
) -> jax.Array:
    """Final hidden states at each slot's predecessor: ``[G·P, S, C, D]``.

    ``prefix`` selects another set of rows of the batch (KTO's mismatched ``kl_*`` rows).
    ``all_layers``: every layer's instead, ``[L+1, G·P, S, C, D]`` (`CausalLM.hidden`; the
    last entry is the default's), each gathered at the slots inside the layer loop.
    """
    tokens = batch[prefix + "tokens"]
    g, k, t = tokens.shape
    idx = batch[prefix + "pred_index"]

    def at_slots(h):
        h = jnp.take_along_axis(h.reshape(g, k * t, -1), idx.reshape(g, -1, 1), axis=1)
        return h.reshape(-1, *idx.shape[2:], h.shape[-1])

    attend = batch.get(prefix + "attend_to")
    h = model.hidden(
        rows(tokens),
        rows(batch[prefix + "positions"]),
        rows(batch[prefix + "segment_ids"]),
        attend_to=None if attend is None else rows(attend),
        span=span,
        all_layers=all_layers,
        select=at_slots if all_layers else None,
    )
    return h if all_layers else at_slots(h)


def token_logps(params, batch, *, scorer: Scorer) -> jax.Array:
    """Per-token log-probs of the model ``params`` at every slot: ``[G·P, S, C]``."""
    model = nnx.merge(scorer.graph, params)
    h = hidden_at_slots(model, batch, span=scorer.span)
    y = pairs(batch["targets"])
    return chunked_token_logps(h, model.unembed_weight(), y, chunk_size=scorer.chunk_size)


def sequence_logps(params, batch, *, scorer: Scorer) -> jax.Array:
    """Summed log-probs per pair slot and side ``[G·P, S]`` (evaluation, caches)."""
    return jnp.sum(token_logps(params, batch, scorer=scorer) * pairs(batch["mask"]), -1)
