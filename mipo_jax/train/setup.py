"""Everything a training run builds before its first step, from the config, once.

    run, state = build(config, workdir)

Order: validate the config (before anything heavy), mesh, data, policy, reference (frozen
live copy, or log-probs from the on-disk cache), the modules trained next to the policy,
optimiser and initial state; then what plugs into the loop, each chosen here once: the
batch source (the data, or DICE/SPIN's rounds), the batch transforms (the learnable prior's
policy samples, TIS-DPO's token weights), the compiled train step and the evaluator. `Run`
is immutable; the train state is the loop's.
"""

import dataclasses
import functools
import logging
import math
import time

import jax
import ml_collections as mlc
from jax.sharding import NamedSharding, PartitionSpec

from mipo_jax import paths
from mipo_jax.data.vocab import check_vocab
from mipo_jax.sharding import make_mesh
from mipo_jax.train import adapters, checks, modules, needs, optim, rounds
from mipo_jax.train import state as st
from mipo_jax.train import token_weights as tw
from mipo_jax.train.data import StepData, fetch, to_device
from mipo_jax.train.evaluation import Evaluator, make_task
from mipo_jax.train.refcache import ReferenceCache, weights_hash
from mipo_jax.train.samples import PolicySamples, Sampler
from mipo_jax.train.scoring import Scorer, token_logps
from mipo_jax.train.step import StepSpec, train_step

log = logging.getLogger("mipo_jax.train")


@dataclasses.dataclass(frozen=True)
class Run:
    """What the loop uses at every step (built once; the train state lives in the loop)."""

    config: mlc.ConfigDict
    workdir: str
    mesh: object
    batch_sharding: NamedSharding
    tokenizer: object
    policy: modules.Built  # graph, shardings and provenance (params: in the state only)
    reference: dict | None  # the frozen live reference's params (with LoRA: the base), or None
    reference_source: str
    spec: StepSpec
    state_shardings: st.TrainState
    num_steps: int
    source: object  # train batches: .next(step, state), .get_state(), .set_state(s)
    transforms: tuple  # host batch transforms: fn(batch, state, step) -> batch
    step_fn: object  # the jitted train step: (state, batch, reference) -> (state, metrics)
    evaluator: Evaluator
    data_reports: dict  # split -> what was read, kept, skipped (per reason) and truncated
    lora: adapters.LoraPolicy | None = None  # model.lora: the state's policy params are adapters

    def policy_params(self, state) -> dict:
        """The policy's parameters as ``policy.graph`` takes them (LoRA: base ∪ adapters)."""
        p = state.params["policy"]
        return p if self.lora is None else self.lora.params(p)


def mesh_of(config):
    """The configured mesh; fixed sizes using fewer devices than exist take the first ones."""
    sizes = (config.mesh.data, config.mesh.fsdp, config.mesh.tensor)
    n = math.prod(sizes)
    devices = jax.devices() if -1 in sizes or n >= jax.device_count() else jax.devices()[:n]
    return make_mesh(sizes, devices=devices)


def _cache_dir(config) -> str:
    if config.reference.cache_dir:
        return config.reference.cache_dir
    from mipo_jax.data.embedded import cache_dir

    return str(cache_dir() / "reference")


def _count(params) -> str:
    n = sum(math.prod(x.shape) for x in jax.tree.leaves(params))
    return f"{n / 1e6:.2f}M parameters"


def _attention_span(*datas) -> int | None:
    """The step's bound on attention reach: the longest packed unit of any split (None if
    a split is padded, whose rows hold one sequence each)."""
    spans = [d.attention_span for d in datas if d is not None]
    return None if None in spans else max(spans)


def _attach_caches(config, policy, datas, batch_sharding) -> None:
    """Reference log-probs from the on-disk cache (computed now on a miss)."""
    scorer = Scorer(policy.graph, chunk_size=int(config.train.logps_chunk))
    fn = jax.jit(functools.partial(token_logps, scorer=scorer))
    # every process passes the same whole batch; all devices score it, every process gets all
    score = lambda b: fetch(fn(policy.params, to_device(b, batch_sharding, whole=True)))
    w = weights_hash(policy.params, repr(policy.config))
    for data in datas:
        cache = ReferenceCache(_cache_dir(config), w, data.data, data.width)
        start = time.time()
        cache.load_or_build(
            score, batch_size=config.reference.batch_size, max_length=data.max_length
        )
        what = "hit" if cache.hit else "miss (built)"
        log.info("reference cache %s: %s [%.1f s]", what, cache.path, time.time() - start)
        data.cache = cache


def run_length(config, train_data: StepData) -> int:
    """Optimiser steps of the run: ``rounds × steps_per_round`` (DICE/SPIN);
    ``train.num_epochs`` passes over the training data (TRL's ``num_train_epochs``); else
    ``train.num_steps``, cut (with a warning) to what ``data.num_epochs`` passes hold."""
    if "rounds" in config:
        return int(config.rounds.num_rounds) * int(config.rounds.steps_per_round)
    epochs = int(config.train.get("num_epochs", 0)) or config.data.num_epochs
    steps = int(config.train.num_steps)
    if not epochs:
        return steps
    it = train_data.iterator
    available = sum(it.steps_per_epoch(e) for e in range(int(epochs)))
    if available == 0:
        raise ValueError(
            f"{config.data.source}: {len(train_data.data)} training examples give no full "
            f"batch (batch_size={config.batch_size}); use a smaller batch_size or more data"
        )
    if config.train.get("num_epochs", 0):
        log.info("train.num_epochs=%d: %d steps", int(epochs), available)
        return available
    if steps > available:
        log.warning(
            "train.num_steps=%d but data.num_epochs=%d holds %d steps: training %d steps "
            "(set train.num_epochs to train by epochs)", steps, int(epochs), available, available,
        )  # fmt: skip
        return available
    return steps


def _token_weighter(config, token_models, mesh, batch_sharding):
    if config.token_weights.transform == "binary":
        return tw.TokenWeighter(config, batch_sharding, None)
    if token_models is None:
        raise ValueError(
            "TIS-DPO's contrastive models are trained or loaded by the run's stages: train "
            "with mipo_jax.run / python -m mipo_jax.main (mipo_jax.train.stages), or pass "
            "token_models=(positive_folder, negative_folder)"
        )
    return tw.TokenWeighter(config, batch_sharding, tw.load_contrastive(config, token_models, mesh))


def build(
    config, workdir: str, *, init=None, token_models=None, train_data=None, eval_data=None
) -> tuple[Run, st.TrainState]:
    """Everything up to the first step, and the initial train state.

    ``init`` overrides ``config.model.init`` (a stage's result, e.g. ``hf:<folder>``);
    ``token_models``: TIS-DPO's (π⁺, π⁻) HF folders; ``train_data``/``eval_data``:
    in-memory data (``datasets.Dataset``, ``DatasetDict`` or a list of row dicts) instead of
    ``data.source``/``data.eval_source``.
    """
    checks.validate(config)
    checks.validate_runtime(config, jax.process_count())
    paths.makedirs(workdir)
    mesh = mesh_of(config)
    batch_sharding = NamedSharding(mesh, PartitionSpec(("data", "fsdp")))
    epochs = int(config.train.get("num_epochs", 0))
    data = dict(train_data=train_data, eval_data=eval_data)
    train_split = StepData(config, "train", num_epochs=epochs or None, **data)
    tokenizer = train_split.tokenizer
    eval_split = None
    if config.train.eval_batches > 0:
        eval_split = StepData(config, "eval", tokenizer=tokenizer, seed=1, **data)
    train_data, eval_data = train_split, eval_split
    reports = {"train": train_data.data.report}
    if eval_data is not None:
        reports["eval"] = eval_data.data.report
    for split, report in reports.items():
        log.info("%s data: %s", split, report.summary())
    policy = modules.build_policy(config.model, tokenizer, mesh, config.seed, init=init)
    log.info("policy: %s (%s)", policy.source, _count(policy.params))
    splits = [d.data for d in (train_data, eval_data) if d is not None]
    check_vocab(policy.config, tokenizer, *splits, name=f"model.init={init or config.model.init}")
    lora = adapters.build(policy, config.model, mesh, config.seed)  # None: model.lora off
    if lora is not None:
        log.info("%s", adapters.describe(lora))

    fields = needs.loss_fields(config)
    live = needs.live_reference(config)
    if lora is None:
        reference = modules.copy_params(policy.params) if live else None
    else:  # the base: the policy's frozen weights and, adapters off, the reference (no copy)
        reference = policy.params
    ref_source = policy.source if needs.needs_reference(config) else "none"
    if config.reference.mode == "cached" and needs.needs_reference(config):
        with jax.set_mesh(mesh):  # traced here: the activation constraints need the mesh
            _attach_caches(config, policy, [d for d in (train_data, eval_data) if d],
                           batch_sharding)  # fmt: skip
        ref_source = f"{policy.source} (cached log-probs)"

    extras = modules.build_extras(config, policy.config, mesh, config.seed)
    total = run_length(config, train_data)
    tx, lr = optim.make_optimizer(config.optim, total)
    moving = ("ref_sync" in config or "rounds" in config) and reference is not None
    aux, aux_sh = (
        ({"reference": reference}, {"reference": policy.shardings}) if moving else ({}, {})
    )
    graph = policy.graph if lora is None else lora.graph
    spec = StepSpec(
        graphs=(("policy", graph),) + tuple((k, v[0]) for k, v in extras.items()),
        ref_graph=policy.graph if live else None,
        loss=mlc.FrozenConfigDict(config.kto if config.objective == "unpaired" else config.loss),
        tx=tx,
        lr=lr,
        fields=fields,
        objective=config.objective,
        grad_accum=int(config.train.grad_accum),
        chunk_size=int(config.train.logps_chunk),
        mask_dropout=float(config.get("mask_net", {}).get("dropout", 0.0)),
        bos_id=int(policy.config.bos_token_id or 0),
        attention_span=_attention_span(train_data, eval_data),
        ref_sync=(
            (int(config.ref_sync.sync_steps), float(config.ref_sync.mixup_alpha))
            if "ref_sync" in config
            else None
        ),
        round_steps=int(config.rounds.steps_per_round) if "rounds" in config else None,
        lora=None if lora is None else lora.adapted,
    )
    own, own_sh = (
        (policy.params, policy.shardings) if lora is None else (lora.adapters, lora.shardings)
    )
    params = {"policy": own, **{k: v[1] for k, v in extras.items()}}
    p_sh = {"policy": own_sh, **{k: v[2] for k, v in extras.items()}}
    if aux:
        reference = None  # the step reads the moving reference from the state
    abstract = jax.eval_shape(lambda p, a: st.init_state(p, tx, config.seed, a), params, aux)
    shardings = st.state_shardings(abstract, tx, p_sh, mesh, aux_sh)
    init_fn = lambda p, a: st.init_state(p, tx, config.seed, a)
    if mesh.size > 1:
        init_fn = jax.jit(init_fn, out_shardings=shardings)
    state = jax.device_put(init_fn(params, aux), shardings)

    sampler = Sampler(graph, train_data.width, policy.config.eos_ids,
                      train_data.data.pad_id, batch_sharding)  # fmt: skip
    scorer = Scorer(graph, chunk_size=int(config.train.logps_chunk))
    transforms, eval_transforms = [], []
    if "prior_model" in config and config.loss.mi_weight:
        samples = PolicySamples(sampler, config.prior_model.samples_per_step, config.seed)
        eval_transforms.append(samples)  # a LoRA evaluator sees the adapted params already
        transforms.append(samples if lora is None else adapters.ViewedTransform(samples, lora))
    if "token_weights" in fields:
        transforms.append(_token_weighter(config, token_models, mesh, batch_sharding))
        eval_transforms.append(transforms[-1])
    source = train_data
    if "rounds" in config:
        source = rounds.RoundSource(config, workdir, train_data, sampler, scorer)

    ref_sh = None if reference is None else policy.shardings
    step_fn = jax.jit(
        functools.partial(train_step, spec=spec),
        in_shardings=(shardings, batch_sharding, ref_sh),
        out_shardings=(shardings, st.replicated(mesh)),
        donate_argnums=0,
    )
    ev_spec, ev_sh, ev_ref, ev_ref_sh, initial = spec, shardings, reference, ref_sh, policy.params
    if lora is not None:
        ev_spec, ev_sh, ev_ref, ev_ref_sh = adapters.evaluator_parts(lora, spec, shardings, live)
        initial = ev_ref
    with jax.set_mesh(mesh):  # the exact task eval scores the reference now (a first trace)
        evaluator = Evaluator(
            ev_spec, ev_sh, batch_sharding, data=eval_data,
            num_batches=config.train.eval_batches, transforms=eval_transforms, reference=ev_ref,
            ref_shardings=ev_ref_sh, task=make_task(config, tokenizer), scorer=scorer,
            initial_policy=initial,
        )  # fmt: skip
    if lora is not None:
        evaluator = adapters.ViewedEvaluator(evaluator, lora)
    run = Run(
        config=config,
        workdir=workdir,
        mesh=mesh,
        batch_sharding=batch_sharding,
        tokenizer=tokenizer,
        policy=dataclasses.replace(
            policy,
            graph=graph,
            params=None,  # the state holds (and donates) them
            shardings=policy.shardings if lora is None else lora.full_shardings,
        ),
        reference=reference,
        reference_source=ref_source,
        spec=spec,
        state_shardings=shardings,
        num_steps=total,
        source=source,
        transforms=tuple(transforms),
        step_fn=step_fn,
        evaluator=evaluator,
        data_reports={k: r.as_dict() for k, r in reports.items()},
        lora=lora,
    )
    return run, state
