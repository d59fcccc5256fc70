"""The train and eval steps: module-level pure functions of (state, batch, reference).

``train_step(state, batch, ref_params, *, spec) -> (state, metrics)`` is jitted once by the
loop with in/out shardings on the mesh and the state donated. The model lives in the state
as plain pytrees (``nnx.split`` outside jit); `mipo_jax.train.inputs` rebuilds it with
``nnx.merge`` inside the differentiated function. Metrics are sums with denominators
(``Metric``), so micro-batch accumulation (a ``lax.scan`` over strided micro-batches, with
the loss's global ``normalizers``) gives the loss, gradients and metrics of one large batch.

Reference models that move are part of the step too, so they are exact and checkpointed:
``state.aux["reference"]`` is read instead of ``ref_params`` when present; DICE/SPIN
(``spec.round_steps``) freeze the policy into it at the first step of each round, and TR-DPO
(``spec.ref_sync``) mixes the updated policy into it every ``sync_steps`` steps.

LoRA (``spec.lora``, `mipo_jax.train.adapters`): ``params["policy"]`` are the adapters and
``ref_params`` the frozen base; the policy runs on base ∪ adapters (`_policy`), so only the
adapters get gradients and optimiser state.
"""

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax

from mipo_jax.losses import kto, mipo_loss
from mipo_jax.losses.kto import kto_loss
from mipo_jax.metrics import Metric
from mipo_jax.models import lora
from mipo_jax.train import inputs
from mipo_jax.train.scoring import pairs, rows
from mipo_jax.train.state import TrainState
from mipo_jax.train.step_batch import split_groups
from mipo_jax.types import CHOSEN


@dataclasses.dataclass(frozen=True)
class StepSpec:
    """Static description of the step (hashable; one compilation per distinct spec).

    Attributes:
      graphs: ``((name, GraphDef), ...)`` of the trainable modules; ``policy`` first.
      ref_graph: GraphDef of the live reference, or None when ``ref_logps`` come with the
        batch (cache) or the loss reads no reference.
      loss: the frozen loss section (``mipo_loss``), or the ``kto`` section when unpaired.
      tx, lr: the optimiser and its schedule.
      fields: the ``TokenInputs`` fields the loss reads (`mipo_jax.train.needs`).
      objective: ``paired`` (the MI-DPO loss), ``unpaired`` (KTO) or ``sft`` (token-mean NLL
        of one completion per slot).
      ref_sync: TR-DPO's ``(sync_steps, mixup_alpha)``, or None.
      round_steps: DICE/SPIN's steps per round (the policy becomes the prior at each round's
        first step), or None.
      lora: `mipo_jax.models.lora.Adapted` when the policy's params are LoRA adapters over
        the base weights passed as ``ref_params``, or None.
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
    ref_sync: tuple[int, float] | None = None
    round_steps: int | None = None
    lora: Any = None

    def graph(self, name: str):
        return dict(self.graphs)[name]


def _policy(params, base, spec: StepSpec, rng=None) -> dict:
    """LoRA: the policy's params as its graph takes them, base ∪ adapters (dropout keys from
    ``rng``, none without); otherwise ``params`` as they are."""
    if spec.lora is None:
        return params
    key = None if rng is None else jax.random.fold_in(rng, 0x4C6F5241)
    return {**params, "policy": lora.combine(base, params["policy"], spec.lora, key)}


def normalizers(batch, spec: StepSpec, params=None, ref_params=None) -> dict[str, jax.Array]:
    """Global denominators of the whole (un-split) batch, for the objective's loss.

    KTO also gets its reference point z_0 over the whole batch (which needs the models);
    ``apo_zero_unpaired`` reads no z_0, so its mismatched rows are not run (TRL's
    ``calculate_KL=False``) and its ``kl`` metric is 0.
    """
    mask = pairs(batch["mask"]).astype(jnp.float32)
    if spec.objective == "sft":
        return {"tokens": jnp.sum(mask * batch["pair_valid"].reshape(-1, 1, 1))}
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
        out["samples"] = jnp.asarray(rows(batch["samples_mask"]).shape[0], jnp.float32)
    return out


def _kto_reference_point(params, ref_params, batch, spec: StepSpec) -> jax.Array:
    """z_0 of the whole batch: one forward-only pass per micro-batch over its mismatched rows
    (a ``lax.scan``, so the peak memory is one micro-batch's), summed, then clamped."""
    n = spec.grad_accum
    if n == 1:
        return kto.reference_point(inputs.kto_kl_sums(params, ref_params, batch, spec))

    def body(total, mb):
        return total + inputs.kto_kl_sums(params, ref_params, mb, spec), None

    zero = Metric(jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32))
    total, _ = jax.lax.scan(body, zero, split_groups(batch, n))
    return kto.reference_point(total)


def sft_loss(lp, batch, norms) -> tuple[jax.Array, dict[str, Metric]]:
    """Token-mean negative log-likelihood of the completions (``norms["tokens"]`` tokens)."""
    mask = batch["mask"].reshape(lp.shape) * batch["pair_valid"].reshape(-1, 1, 1)
    nll = -jnp.sum(lp * mask)
    loss = nll / jnp.maximum(norms["tokens"], 1.0)
    return loss, {"loss": Metric(loss, jnp.sum(mask) / jnp.maximum(norms["tokens"], 1.0))}


def loss_fn(params, ref_params, batch, rng, *, spec: StepSpec, norms):
    """``(loss, metrics)`` of one (micro-)batch; ``norms`` are the whole batch's counts."""
    params = _policy(params, ref_params, spec, rng)
    if spec.objective == "sft":
        return sft_loss(inputs.sft_logps(params, batch, spec), batch, norms)
    if spec.objective == "unpaired":
        return kto_loss(inputs.unpaired_inputs(params, ref_params, batch, spec), spec.loss,
                        normalizers=norms)  # fmt: skip
    token_inputs, logits = inputs.token_inputs(params, ref_params, batch, rng, spec)
    loss, metrics = mipo_loss(token_inputs, spec.loss, normalizers=norms)
    mask = token_inputs.mask * token_inputs.pair_valid[:, None, None]
    for side, name in enumerate(("chosen", "rejected")):  # TRL: mean logit of its tokens
        m = mask[:, side]
        metrics[f"logits/{name}"] = Metric(jnp.sum(logits[:, side] * m), jnp.sum(m))
    return loss, metrics


def _grads(params, ref_params, batch, rng, spec: StepSpec):
    """Summed gradients and metrics over ``spec.grad_accum`` strided micro-batches."""
    norms = normalizers(batch, spec, _policy(params, ref_params, spec), ref_params)
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


def _moving_reference(state: TrainState, spec: StepSpec):
    """The reference this step reads from the state: a new round starts from the policy."""
    ref = state.aux["reference"]
    if spec.round_steps:
        fresh = state.step % spec.round_steps == 0
        ref = jax.tree.map(lambda p, r: jnp.where(fresh, p, r), state.params["policy"], ref)
    return ref


def _synced(reference, policy, step, spec: StepSpec):
    """TR-DPO: after ``step`` updates, ``a·θ + (1 − a)·θ_ref`` every ``sync_steps`` steps."""
    every, a = spec.ref_sync
    mixed = jax.tree.map(lambda x, y: a * x + (1.0 - a) * y, policy, reference)
    do = step % every == 0
    return jax.tree.map(lambda m, r: jnp.where(do, m, r), mixed, reference)


def all_finite(tree) -> jax.Array:
    """True when every floating-point value in ``tree`` is finite (a scalar bool array)."""
    leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
    if not leaves:
        return jnp.asarray(True)
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))


def train_step(state: TrainState, batch: dict, ref_params, *, spec: StepSpec):
    """One optimiser step. A step whose loss, gradient or updated parameters are not all
    finite is skipped: parameters and optimiser state stay as they were, ``nonfinite``
    (consecutive) and ``skipped`` (all) count it."""
    rng, key = jax.random.split(jax.random.wrap_key_data(state.rng))
    aux = dict(state.aux)
    if "reference" in aux:
        ref_params = aux["reference"] = _moving_reference(state, spec)
    loss, grads, metrics = _grads(state.params, ref_params, batch, key, spec)
    grad_norm = optax.tree.norm(grads)
    updates, opt_state = spec.tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & all_finite(params)
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
    params = keep(params, state.params)
    if spec.ref_sync is not None:
        aux["reference"] = _synced(aux["reference"], params["policy"], state.step + 1, spec)
    new = state.replace(
        step=state.step + 1,
        params=params,
        opt_state=keep(opt_state, state.opt_state),
        rng=jax.random.key_data(rng),
        nonfinite=nonfinite,
        skipped=skipped,
        aux=aux,
    )
    return new, metrics


def eval_step(params: dict, batch: dict, ref_params, *, spec: StepSpec) -> dict[str, Metric]:
    """The loss's metrics on a held-out batch (no dropout, no update)."""
    spec = dataclasses.replace(spec, mask_dropout=0.0, grad_accum=1)
    norms = normalizers(batch, spec, _policy(params, ref_params, spec), ref_params)
    _, metrics = loss_fn(params, ref_params, batch, None, spec=spec, norms=norms)
    return dict(metrics)
