"""The train and eval steps: module-level pure functions of (state, batch, reference).

``train_step(state, batch, ref_params, *, spec) -> (state, metrics)`` is jitted once by the
loop with in/out shardings on the mesh and the state donated. The model lives in the state
as plain pytrees (``nnx.split`` outside jit); the step rebuilds it with ``nnx.merge`` inside
the differentiated function. Metrics are sums with denominators (``Metric``), so micro-batch
accumulation (a ``lax.scan`` over strided micro-batches, with the loss's global
``normalizers``) gives the loss, gradients and metrics of one large batch.

Per group of the batch (see :mod:`mipo_jax.train.layout`) the policy runs once over all rows
(chosen and rejected together), and only completion slots reach the chunked log-prob path
(hidden states + unembedding, never ``[B, T, V]`` logits). The reference is either live
(``ref_params``: frozen, no gradient) or read from the batch (``ref_logps``, a cache).
"""

import dataclasses
import re
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from mipo_jax.losses import kto, mipo_loss
from mipo_jax.losses.kto import UnpairedInputs, kto_loss
from mipo_jax.losses.logps import chunked_token_logps, chunked_token_stats
from mipo_jax.metrics import Metric
from mipo_jax.train.extras import prior_logps
from mipo_jax.train.layout import split_groups
from mipo_jax.train.state import TrainState
from mipo_jax.types import CHOSEN, TokenInputs


@dataclasses.dataclass(frozen=True)
class StepSpec:
    """Static description of the step (hashable; one compilation per distinct spec).

    Attributes:
      graphs: ``((name, GraphDef), ...)`` of the trainable modules; ``policy`` first.
      ref_graph: GraphDef of the live reference, or None when ``ref_logps`` come with the
        batch (cache) or the loss reads no reference.
      loss: the frozen loss section (``mipo_loss``), or the ``kto`` section when unpaired.
      fields: the ``TokenInputs`` fields the loss reads (see ``inputs.required_fields``).
      tx, lr: the optimiser and its schedule.
    """

    graphs: tuple
    ref_graph: Any
    loss: Any
    tx: Any
    lr: Any
    fields: frozenset = frozenset()
    objective: str = "paired"
    grad_accum: int = 1
    chunk_size: int = 256
    mask_dropout: float = 0.0
    bos_id: int = 0
    attention_span: int | None = None  # bound on the main rows' `masks.attention_span`

    def graph(self, name: str):
        return dict(self.graphs)[name]


def _rows(x: jax.Array) -> jax.Array:
    """``[G, K, ...] -> [G·K, ...]``."""
    return x.reshape(-1, *x.shape[2:])


def _pairs(x: jax.Array) -> jax.Array:
    """``[G, P, 2, C, ...] -> [G·P, 2, C, ...]``."""
    return x.reshape(-1, *x.shape[2:])


def hidden_at_slots(
    model, batch, prefix: str = "", span: int | None = None, all_layers: bool = False
) -> jax.Array:
    """Final hidden states at each slot's predecessor: ``[G·P, 2, C, D]``.

    ``span``: a bound on the rows' attention reach (`CausalLM.hidden`), e.g. the longest
    packed unit; blocked attention then skips the key blocks beyond it. ``all_layers``:
    every layer's instead, ``[L+1, G·P, 2, C, D]`` (`CausalLM.hidden`; the last entry is
    the default's), each gathered at the slots inside the layer loop.
    """
    tokens = batch[prefix + "tokens"]
    g, k, t = tokens.shape
    idx = batch[prefix + "pred_index"]

    def at_slots(h):
        h = jnp.take_along_axis(h.reshape(g, k * t, -1), idx.reshape(g, -1, 1), axis=1)
        return h.reshape(-1, *idx.shape[2:], h.shape[-1])

    attend = batch.get(prefix + "attend_to")
    h = model.hidden(
        _rows(tokens),
        _rows(batch[prefix + "positions"]),
        _rows(batch[prefix + "segment_ids"]),
        attend_to=None if attend is None else _rows(attend),
        span=span,
        all_layers=all_layers,
        select=at_slots if all_layers else None,
    )
    return h if all_layers else at_slots(h)


def _reference(spec: StepSpec, ref_params, batch, all_layers: bool = False):
    """(hidden at slots, unembedding, every layer's hidden at slots or None) of the live
    reference, all without gradient."""
    ref = nnx.merge(spec.ref_graph, ref_params)
    h = hidden_at_slots(ref, batch, span=spec.attention_span, all_layers=all_layers)
    h, layers = (h[-1], h) if all_layers else (h, None)
    sg = jax.lax.stop_gradient
    return sg(h), sg(ref.unembed_weight()), None if layers is None else sg(layers)


def token_inputs(params, ref_params, batch, rng, spec: StepSpec) -> TokenInputs:
    """Run the models over the batch and fill the ``TokenInputs`` the loss reads."""
    fields = spec.fields
    policy = nnx.merge(spec.graph("policy"), params["policy"])
    h, w = hidden_at_slots(policy, batch, span=spec.attention_span), policy.unembed_weight()
    targets = _pairs(batch["targets"])
    live = spec.ref_graph is not None
    need_masks = "mask_u" in fields
    if need_masks and not live:
        raise ValueError("SparsePO's mask network reads the reference: use a live reference")
    ref_h, ref_w, ref_layers = (
        _reference(spec, ref_params, batch, need_masks) if live else (None,) * 3
    )
    need_kl = "kl" in fields
    if need_kl and not live:
        raise ValueError("the loss needs the per-token KL to the reference: use a live reference")
    stats = chunked_token_stats(
        h,
        w,
        targets,
        logsumsq="logsumsq" in fields,
        ref_h=ref_h if need_kl else None,
        ref_w=ref_w if need_kl else None,
        chunk_size=spec.chunk_size,
    )
    mask = _pairs(batch["mask"]).astype(jnp.float32)
    extra = {}
    if "reference" in fields:
        if "ref_logps" in batch:
            extra["reference"] = _pairs(batch["ref_logps"])
        elif live:
            lp = chunked_token_logps(ref_h, ref_w, targets, chunk_size=spec.chunk_size)
            extra["reference"] = jax.lax.stop_gradient(lp)
        else:
            raise ValueError("the loss reads a reference: give a live one or a reference cache")
    if need_kl:
        extra["kl"] = stats.kl
    if "logsumsq" in fields:
        extra["logsumsq"] = stats.logsumsq
    if "token_weights" in fields:
        extra["token_weights"] = _pairs(batch["token_weights"])
    if need_masks:  # the net reads layers 1..L (HEBO SparsePO's `reference_states[1:]`)
        net = nnx.merge(spec.graph("mask_net"), params["mask_net"])
        extra["mask_u"], mask_d = net(ref_layers[1:], rng, spec.mask_dropout)
        if mask_d is not None:
            extra["mask_d"] = mask_d
    if "prior" in fields:
        extra.update(_learned_prior(params, batch, spec, targets, mask))
    valid = batch["pair_valid"].reshape(-1)
    return TokenInputs(policy=stats.logps, mask=mask, pair_valid=valid, **extra)


def _learned_prior(params, batch, spec, targets, mask) -> dict:
    """log ζ_φ on the batch's completions and, for the MI term, on policy samples."""
    prior = nnx.merge(spec.graph("prior"), params["prior"])
    out = {"prior": prior_logps(prior, targets, mask, spec.bos_id, spec.chunk_size)}
    if "samples" in batch:
        s, s_mask = _rows(batch["samples"]), _rows(batch["samples_mask"]).astype(jnp.float32)
        out["prior_samples"] = prior_logps(prior, s, s_mask, spec.bos_id, spec.chunk_size)
        out["prior_samples_mask"] = s_mask
    return out


def _unpaired_logps(model, w, batch, prefix: str, spec: StepSpec) -> jax.Array:
    """Per-token log-probs ``[N, C]`` of the rows named by ``prefix`` (side axis of size 1)."""
    h = hidden_at_slots(model, batch, prefix)[:, 0]
    y = _pairs(batch[prefix + "targets"])[:, 0]
    return chunked_token_logps(h, w, y, chunk_size=spec.chunk_size)


def _unpaired_reference(ref_params, batch, spec: StepSpec, prefix: str) -> jax.Array:
    """Reference log-probs of the ``prefix`` rows: cached with the batch, or the live model."""
    key = "kl_ref_logps" if prefix == "kl_" else "ref_logps"
    if key in batch:
        return _pairs(batch[key])[:, 0]
    if spec.ref_graph is None:
        raise ValueError(
            f"KTO needs reference log-probs of the {'mismatched ' if prefix else ''}rows "
            f"(batch field {key!r} is missing): use reference.mode='live'"
        )
    ref = nnx.merge(spec.ref_graph, ref_params)
    return _unpaired_logps(ref, ref.unembed_weight(), batch, prefix, spec)


def kto_kl_sums(params, ref_params, batch, spec: StepSpec) -> Metric:
    """KTO: Σ valid·log π/π_ref over the batch's ``kl_*`` rows (each prompt with another
    example's completion, TRL's mismatched pairs) and Σ valid. Forward only, detached."""
    policy = nnx.merge(spec.graph("policy"), params["policy"])
    sg = jax.lax.stop_gradient
    valid = kto.example_valid(_pairs(batch["mask"])[:, 0], batch["pair_valid"].reshape(-1))
    return kto.mismatched_kl(
        sg(_unpaired_logps(policy, policy.unembed_weight(), batch, "kl_", spec)),
        sg(_unpaired_reference(ref_params, batch, spec, "kl_")),
        _pairs(batch["kl_mask"])[:, 0].astype(jnp.float32),
        valid,
    )


def unpaired_inputs(params, ref_params, batch, spec: StepSpec) -> UnpairedInputs:
    """KTO: one completion per slot (side axis of size 1). The mismatched rows are not run
    here: the step computes z_0 from them first (`kto_kl_sums`) and passes it on."""
    policy = nnx.merge(spec.graph("policy"), params["policy"])
    return UnpairedInputs(
        policy=_unpaired_logps(policy, policy.unembed_weight(), batch, "", spec),
        mask=_pairs(batch["mask"])[:, 0].astype(jnp.float32),
        reference=jax.lax.stop_gradient(_unpaired_reference(ref_params, batch, spec, "")),
        label=batch["label"].reshape(-1).astype(jnp.float32),
        valid=batch["pair_valid"].reshape(-1),
    )


def normalizers(batch, spec: StepSpec, params=None, ref_params=None) -> dict[str, jax.Array]:
    """Global denominators of the whole (un-split) batch, for ``mipo_loss`` / ``kto_loss``.

    KTO also gets its reference point z_0 over the whole batch (which needs the models);
    ``apo_zero_unpaired`` reads no z_0, so its mismatched rows are not run (TRL's
    ``calculate_KL=False``) and its ``kl`` metric is 0.
    """
    mask = _pairs(batch["mask"]).astype(jnp.float32)
    if spec.objective == "unpaired":
        valid = kto.example_valid(mask[:, 0], batch["pair_valid"].reshape(-1))
        if spec.loss.loss_type == "kto":
            z0 = _kto_reference_point(params, ref_params, batch, spec)
        else:
            z0 = jnp.zeros((), jnp.float32)
        return {"examples": jnp.sum(valid), "z0": z0}
    valid = batch["pair_valid"].reshape(-1) * jnp.all(jnp.sum(mask, -1) > 0, axis=-1)
    out = {"pairs": jnp.sum(valid), "sft_tokens": jnp.sum(mask[:, CHOSEN] * valid[:, None])}
    if "samples_mask" in batch:
        out["samples"] = jnp.asarray(_rows(batch["samples_mask"]).shape[0], jnp.float32)
    return out


def _kto_reference_point(params, ref_params, batch, spec: StepSpec) -> jax.Array:
    """z_0 of the whole batch: one forward-only pass per micro-batch over its mismatched rows
    (a ``lax.scan``, so the peak memory is one micro-batch's), summed, then clamped."""
    n = spec.grad_accum
    if n == 1:
        return kto.reference_point(kto_kl_sums(params, ref_params, batch, spec))

    def body(total, mb):
        return total + kto_kl_sums(params, ref_params, mb, spec), None

    zero = Metric(jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32))
    total, _ = jax.lax.scan(body, zero, split_groups(batch, n))
    return kto.reference_point(total)


def loss_fn(params, ref_params, batch, rng, *, spec: StepSpec, norms):
    """``(loss, metrics)`` of one (micro-)batch; ``norms`` are the whole batch's counts."""
    if spec.objective == "unpaired":
        inputs = unpaired_inputs(params, ref_params, batch, spec)
        return kto_loss(inputs, spec.loss, normalizers=norms)
    return mipo_loss(
        token_inputs(params, ref_params, batch, rng, spec), spec.loss, normalizers=norms
    )


def _grads(params, ref_params, batch, rng, spec: StepSpec):
    """Summed gradients and metrics over ``spec.grad_accum`` strided micro-batches."""
    norms = normalizers(batch, spec, params, ref_params)
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    n = spec.grad_accum
    if n == 1:
        (loss, metrics), grads = grad_fn(params, ref_params, batch, rng, spec=spec, norms=norms)
        return loss, grads, metrics
    micro = split_groups(batch, n)
    rngs = jax.random.split(rng, n)

    def body(carry, xs):
        loss, grads, metrics = carry
        mb, key = xs
        (l_i, m_i), g_i = grad_fn(params, ref_params, mb, key, spec=spec, norms=norms)
        add = lambda a, b: jax.tree.map(jnp.add, a, b)
        return (loss + l_i, add(grads, g_i), add(metrics, m_i)), None

    first = jax.tree.map(lambda x: x[0], micro)
    shapes = jax.eval_shape(lambda: loss_fn(params, ref_params, first, rng, spec=spec, norms=norms))
    zeros = lambda tree: jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), tree)
    init = (zeros(shapes[0]), jax.tree.map(jnp.zeros_like, params), zeros(shapes[1]))
    (loss, grads, metrics), _ = jax.lax.scan(body, init, (micro, rngs))
    return loss, grads, metrics


def _scalar(x) -> Metric:
    return Metric(jnp.asarray(x, jnp.float32), jnp.ones((), jnp.float32))


def train_step(state: TrainState, batch: dict, ref_params, *, spec: StepSpec):
    """One optimiser step; a non-finite loss or gradient leaves params and optimiser as is."""
    rng, key = jax.random.split(jax.random.wrap_key_data(state.rng))
    ref_params = state.aux.get("reference", ref_params)
    loss, grads, metrics = _grads(state.params, ref_params, batch, key, spec)
    grad_norm = optax.tree.norm(grads)
    ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    updates, opt_state = spec.tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)
    nonfinite = jnp.where(ok, 0, state.nonfinite + 1)
    skipped = state.skipped + (~ok).astype(jnp.int32)
    metrics = dict(metrics)
    metrics.update(
        grad_norm=_scalar(grad_norm),
        learning_rate=_scalar(spec.lr(state.step)),
        num_tokens=_scalar(jnp.sum(batch["segment_ids"] > 0)),
        skipped=_scalar(skipped),
        nonfinite=_scalar(nonfinite),
    )
    new = state.replace(
        step=state.step + 1,
        params=keep(params, state.params),
        opt_state=keep(opt_state, state.opt_state),
        rng=jax.random.key_data(rng),
        nonfinite=nonfinite,
        skipped=skipped,
    )
    return new, metrics


def eval_step(params: dict, batch: dict, ref_params, *, spec: StepSpec) -> dict[str, Metric]:
    """The loss's metrics on a held-out batch (no dropout, no update)."""
    spec = dataclasses.replace(spec, mask_dropout=0.0, grad_accum=1)
    norms = normalizers(batch, spec, params, ref_params)
    _, metrics = loss_fn(params, ref_params, batch, None, spec=spec, norms=norms)
    return dict(metrics)


def sequence_logps(params, batch, *, spec: StepSpec) -> jax.Array:
    """Summed policy log-probs per pair and side ``[G·P, 2]`` (evaluation, caches)."""
    return jnp.sum(token_logps(params, batch, spec=spec) * _pairs(batch["mask"]), -1)


def token_logps(params, batch, *, spec: StepSpec) -> jax.Array:
    """Per-token log-probs of the module ``params`` (graph ``policy``): ``[G·P, 2, C]``."""
    model = nnx.merge(spec.graph("policy"), params)
    h = hidden_at_slots(model, batch, span=spec.attention_span)
    y = _pairs(batch["targets"])
    return chunked_token_logps(h, model.unembed_weight(), y, chunk_size=spec.chunk_size)


_MISSING = re.compile(r"needs TokenInputs field\(s\) \[([^\]]*)\]")
OPTIONAL_FIELDS = ("reference", "kl", "token_weights", "mask_u", "logsumsq", "prior")


def required_fields(loss_cfg) -> frozenset:
    """The ``TokenInputs`` fields ``mipo_loss`` reads under ``loss_cfg``, found by tracing.

    Traces the loss (shapes only) with the fields found so far and adds the ones it asks
    for, so a new prior or term needs no table here. ``mask_d`` and the prior samples follow
    from ``mask_u`` and ``prior``.
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
