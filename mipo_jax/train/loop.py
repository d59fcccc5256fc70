"""The host loop: build everything from a config, train, evaluate, checkpoint, export.

    summary = train(config, workdir)

Order of work: validate the config (before anything heavy), mesh, data, policy (optionally
SFT, which then is also the reference), reference (live copy or on-disk cache), optimiser and
state, resume from the workdir's newest usable checkpoint, then steps. Step t+1 is dispatched
before step t's metrics are fetched, so the host never waits on the device to log. Writes
``metrics.jsonl``, TensorBoard events, ``checkpoints/``, ``export/`` (HF folder),
``curves.png`` and ``summary.json`` under the workdir.
"""

import dataclasses
import functools
import json
import logging
import math
import os
import time

import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from mipo_jax.checkpoint import Checkpointer, PreemptionGuard
from mipo_jax.metrics import Metric
from mipo_jax.sharding import make_mesh
from mipo_jax.train import checks, optim, rounds, sft, task_eval
from mipo_jax.train import models as mdl
from mipo_jax.train import state as st
from mipo_jax.train.data import StepData, fetch, to_device
from mipo_jax.train.refcache import ReferenceCache, weights_hash
from mipo_jax.train.step import StepSpec, eval_step, required_fields, sequence_logps, train_step
from mipo_jax.train.token_weights import Preempted, TokenWeighter
from mipo_jax.train.writer import MetricWriter, plot

log = logging.getLogger("mipo_jax.train")


class NonFiniteError(RuntimeError):
    """Too many non-finite steps in a row; the last saved checkpoint is intact."""


@dataclasses.dataclass
class Run:
    """What the loop builds once and then uses at every step."""

    config: mlc.ConfigDict
    workdir: str
    mesh: object
    batch_sharding: NamedSharding
    train_data: StepData
    eval_data: StepData | None
    tokenizer: object
    policy: mdl.Built
    reference: dict | None  # frozen reference params (live mode), else None
    reference_source: str
    spec: StepSpec
    state: st.TrainState
    state_shardings: st.TrainState
    num_steps: int
    task: task_eval.TaskEval | None = None
    ref_task_logprobs: np.ndarray | None = None
    weighter: object = None
    score_fn: object = None
    round: int | None = None
    round_data: object = None


def _mesh(config):
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


def _needs_reference(config, fields) -> bool:
    return config.objective == "unpaired" or bool({"reference", "kl", "mask_u"} & fields)


def build(config, workdir: str, start: mdl.Built | None = None) -> Run:
    """Everything up to the first step (resume included).

    ``start``: the policy's starting model, already built (it is then also the reference and
    no SFT stage runs); TIS-DPO trains its contrastive models this way from the reference.
    """
    checks.validate(config)
    checks.validate_runtime(config, jax.process_count())
    os.makedirs(workdir, exist_ok=True)
    mesh = _mesh(config)
    batch_sharding = NamedSharding(mesh, PartitionSpec(("data", "fsdp")))
    train_data = StepData(config, "train")
    tokenizer = train_data.tokenizer
    eval_data = None
    if config.train.eval_batches > 0:
        eval_data = StepData(config, config.train.eval_split, tokenizer=tokenizer, seed=1)
    if start is None:
        policy = mdl.build_policy(config.model, tokenizer, mesh, config.seed)
        log.info("policy: %s (%s)", policy.source, _count(policy.params))
        policy = _maybe_sft(config, workdir, policy, tokenizer, mesh, batch_sharding, train_data)
    else:
        policy = start

    fields = frozenset() if config.objective == "unpaired" else required_fields(config.loss)
    weighter = None
    if "token_weights" in fields:  # TIS-DPO: contrastive models from the reference, first
        weighter = TokenWeighter.build(config, policy, train_data, mesh, batch_sharding)
    live = config.reference.mode == "live" and _needs_reference(config, fields)
    reference = mdl.copy_params(policy.params) if live else None
    ref_source = policy.source if _needs_reference(config, fields) else "none"
    if config.reference.mode == "cached" and _needs_reference(config, fields):
        _attach_caches(config, policy, train_data, eval_data, batch_sharding, mesh)
        ref_source = f"{policy.source} (cached log-probs)"

    extras = mdl.build_extras(config, policy.config, mesh, config.seed)
    total = rounds.total_steps(config)
    tx, lr = optim.make_optimizer(config.optim, total)
    graphs = (("policy", policy.graph),) + tuple((k, v[0]) for k, v in extras.items())
    aux, aux_sh = rounds.initial_aux(config, reference, policy)
    spec = StepSpec(
        graphs=graphs,
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
    )
    params = {"policy": policy.params, **{k: v[1] for k, v in extras.items()}}
    p_sh = {"policy": policy.shardings, **{k: v[2] for k, v in extras.items()}}
    if aux:
        reference = None  # the step reads the moving reference from the state
    abstract = jax.eval_shape(lambda p, a: st.init_state(p, tx, config.seed, a), params, aux)
    shardings = st.state_shardings(abstract, tx, p_sh, mesh, aux_sh)
    init = lambda p, a: st.init_state(p, tx, config.seed, a)
    if mesh.size > 1:
        init = jax.jit(init, out_shardings=shardings)
    state = jax.device_put(init(params, aux), shardings)
    run = Run(
        config=config,
        workdir=workdir,
        mesh=mesh,
        batch_sharding=batch_sharding,
        train_data=train_data,
        eval_data=eval_data,
        tokenizer=tokenizer,
        policy=policy,
        reference=reference,
        reference_source=ref_source,
        spec=spec,
        state=state,
        state_shardings=shardings,
        num_steps=total,
    )
    run.weighter = weighter
    if config.train.task_eval_prompts and config.data.source in task_eval.TASKS:
        run.task = task_eval.TaskEval(config.data.source, tokenizer, config.train.task_eval_prompts)
    return run


def _attention_span(*datas) -> int | None:
    """The step's bound on attention reach: the longest packed unit of any split (None if
    a split is padded, whose rows hold one sequence each)."""
    spans = [d.attention_span for d in datas if d is not None]
    return None if None in spans else max(spans)


def _count(params) -> str:
    n = sum(math.prod(x.shape) for x in jax.tree.leaves(params))
    return f"{n / 1e6:.2f}M parameters"


def _sft_export(config, workdir: str) -> str | None:
    """The SFT stage's HF folder (the run's reference), when the config has an SFT stage."""
    return sft.export_dir(workdir) if config.sft.steps else None


def _maybe_sft(config, workdir, policy, tokenizer, mesh, batch_sharding, train_data):
    """Run (or reload) the SFT stage; its result is the policy's start and the reference."""
    if not config.sft.steps:
        return policy
    folder = sft.export_dir(workdir)
    source = f"sft:{folder} (from {policy.source}, {config.sft.steps} steps)"
    if os.path.exists(os.path.join(folder, "config.json")):
        log.info("SFT: reusing %s", folder)
        return mdl.load_folder(folder, config.model, mesh, source)
    writer = MetricWriter(workdir, tensorboard=False)
    start = time.time()
    params, nll = sft.run(
        config, policy, tokenizer, mesh, batch_sharding, train=train_data.data, writer=writer
    )
    log.info("SFT took %.1f s", time.time() - start)
    sft.save(policy.graph, params, tokenizer, workdir)
    return dataclasses.replace(policy, params=params, source=source)


def _attach_caches(config, policy, train_data, eval_data, batch_sharding, mesh):
    """Reference log-probs from the on-disk cache (computed now on a miss)."""
    spec = StepSpec(graphs=(("policy", policy.graph),), ref_graph=None, loss=None, tx=None, lr=None)
    from mipo_jax.train.step import token_logps

    fn = jax.jit(functools.partial(token_logps, spec=spec))
    # every process passes the same whole batch; all devices score it, every process gets all
    score = lambda b: fetch(fn(policy.params, to_device(b, batch_sharding, whole=True)))
    w = weights_hash(policy.params, repr(policy.config))
    for data in (train_data, eval_data):
        if data is None:
            continue
        cache = ReferenceCache(_cache_dir(config), w, data.data, data.width)
        start = time.time()
        cache.load_or_build(
            score, batch_size=config.reference.batch_size, max_length=data.max_length
        )
        what = "hit" if cache.hit else "miss (built)"
        log.info("reference cache %s: %s [%.1f s]", what, cache.path, time.time() - start)
        data.cache = cache


# ------------------------------------------------------------------------------------------
# the loop
# ------------------------------------------------------------------------------------------


def _values(metrics) -> dict[str, float]:
    return {k: float(m.value) for k, m in jax.device_get(metrics).items()}


def compile_steps(run: Run):
    """The one jitted train step (donated state, shardings on the mesh) and the eval step."""
    rep = st.replicated(run.mesh)
    ref_sh = None if run.reference is None else run.policy.shardings
    step = jax.jit(
        functools.partial(train_step, spec=run.spec),
        in_shardings=(run.state_shardings, run.batch_sharding, ref_sh),
        out_shardings=(run.state_shardings, rep),
        donate_argnums=0,
    )
    ev = jax.jit(
        functools.partial(eval_step, spec=run.spec),
        in_shardings=(run.state_shardings.params, run.batch_sharding, ref_sh),
        out_shardings=rep,
    )
    return step, ev


def evaluate(run: Run, eval_fn, state) -> dict[str, float]:
    """Held-out metrics over ``eval_batches`` batches (sums, then values), plus task metrics.

    Every evaluation scores the same batches (the eval split's first ``eval_batches``), so
    eval curves compare across steps and a resumed run evaluates as an uninterrupted one.
    """
    out: dict[str, float] = {}
    if run.eval_data is not None:
        run.eval_data.set_state({"epoch": 0, "step": 0})
        total = None
        ref = state.aux.get("reference", run.reference)
        for _ in range(int(run.config.train.eval_batches)):
            batch = rounds.prepare(run, next(run.eval_data), -1)
            m = eval_fn(state.params, to_device(batch, run.batch_sharding), ref)
            total = m if total is None else {k: total[k] + m[k] for k in m}
        out.update(_values(total))
    if run.task is not None:
        out.update({f"true/{k}": v for k, v in task_metrics(run, state.params["policy"]).items()})
    return out


def task_metrics(run: Run, params) -> dict[str, float]:
    """Exact E[r] and KLs on the controlled task (reference scored once)."""
    spec = StepSpec(
        graphs=(("policy", run.policy.graph),), ref_graph=None, loss=None, tx=None, lr=None
    )
    fn = jax.jit(functools.partial(sequence_logps, spec=spec))
    score = lambda p: lambda b: fetch(fn(p, to_device(b, run.batch_sharding, whole=True)))
    if run.ref_task_logprobs is None:
        ref = run.reference if run.reference is not None else run.policy.params
        run.ref_task_logprobs = run.task.logprobs(score(ref))
    return run.task.metrics(run.task.logprobs(score(params)), run.ref_task_logprobs)


def train(config, workdir: str, start: mdl.Built | None = None) -> dict:
    """Train as configured; returns (and writes) a summary of the run (``start``: see build)."""
    t0 = time.time()
    try:
        run = build(config, workdir, start)
    except Preempted as stop:
        log.warning("%s; checkpoint saved, exiting cleanly", stop)
        return {"stopped": "preempted", "step": 0}
    step_fn, eval_fn = compile_steps(run)
    cfg = config
    ckpt = Checkpointer(
        os.path.join(workdir, "checkpoints"),
        save_every=int(cfg.checkpoint.every),
        keep=int(cfg.checkpoint.keep),
        async_save=bool(cfg.checkpoint.async_save),
        config=cfg,
        metadata={"reference": {"mode": cfg.reference.mode, "source": run.reference_source}},
    )
    abstract = st.abstract(run.state, run.state_shardings)
    restored = ckpt.restore_or_none(abstract)
    start = 0
    if restored is not None:
        run.state, start = restored.state, int(restored.step)
        rounds.restore_data(run, restored.data_iter)
        log.info("resumed from %s at step %d", restored.path, start)
    writer = MetricWriter(workdir)
    first_eval = None
    if start == 0 and (cfg.train.eval_batches > 0 or run.task is not None):
        first_eval = evaluate(run, eval_fn, run.state)
        writer.write(0, first_eval, "eval")
    bar = _progress(cfg, start, run.num_steps)
    pending, step, clock = None, start, _Throughput()
    stopped = None
    with ckpt, PreemptionGuard() as guard:
        for step in range(start, run.num_steps):
            host_batch = rounds.next_batch(run, step)
            batch = to_device(host_batch, run.batch_sharding)
            run.state, metrics = step_fn(run.state, batch, run.reference)
            if pending is not None:
                _report(run, writer, bar, pending, clock)
            pending = (step + 1, metrics, int(np.sum(np.asarray(host_batch["segment_ids"]) > 0)))
            rounds.after_step(run, step + 1)
            periodic = cfg.train.eval_every and (step + 1) % cfg.train.eval_every == 0
            if periodic and step + 1 < run.num_steps:
                writer.write(step + 1, evaluate(run, eval_fn, run.state), "eval")
            data_state = rounds.data_state(run)
            ckpt.save(step + 1, run.state, data_iter=data_state)
            if guard.should_stop(step + 1):
                stopped = "preempted"
                break
        if pending is not None:
            _report(run, writer, bar, pending, clock)
        ckpt.save(step + 1 if run.num_steps > start else start, run.state,
                  data_iter=rounds.data_state(run), force=True, wait=True)  # fmt: skip
    if bar is not None:
        bar.close()
    if stopped:
        log.warning("stopped by SIGTERM at step %d; checkpoint saved, exiting cleanly", step + 1)
        writer.close()
        return {"stopped": stopped, "step": step + 1}
    final = evaluate(run, eval_fn, run.state)
    writer.write(run.num_steps, final, "eval")
    writer.close()
    summary = _finish(run, first_eval, final, time.time() - t0)
    return summary


def _progress(cfg, start, total):
    if not cfg.train.progress or jax.process_index() != 0:
        return None
    from tqdm import tqdm

    return tqdm(
        total=total, initial=start, unit="step", dynamic_ncols=True, smoothing=0.1, mininterval=1.0
    )


class _Throughput:
    """Running steps/s and tokens/s since the first fetched step (compilation excluded).

    Averaging from the first fetch is right whether dispatch is asynchronous (a fetch ends
    step t) or effectively synchronous, as on CPU (a fetch comes after step t + 1 ran).
    """

    def __init__(self):
        self.t0, self.steps, self.tokens = None, 0, 0

    def update(self, tokens: int) -> dict[str, float]:
        now = time.time()
        if self.t0 is None:
            self.t0 = now
            return {}
        self.steps, self.tokens = self.steps + 1, self.tokens + tokens
        dt = max(now - self.t0, 1e-9)
        return {"steps_per_sec": self.steps / dt, "tokens_per_sec": self.tokens / dt}


def _report(run: Run, writer, bar, pending, clock: _Throughput):
    """Fetch a finished step's metrics (one step behind dispatch), log them, guard NaNs."""
    step, metrics, tokens = pending
    values = _values(metrics)
    values.update(clock.update(tokens))
    cfg = run.config.train
    if cfg.log_every and step % cfg.log_every == 0:
        writer.write(step, values)
    if bar is not None:
        bar.update(1)
        acc = values.get("rewards/accuracies", 0.0)
        tok_s = values.get("tokens_per_sec", 0.0)
        bar.set_postfix(loss=f"{values['loss']:.4f}", acc=f"{acc:.2f}", tok_s=f"{tok_s:,.0f}")
    if values["nonfinite"] >= cfg.max_nonfinite:
        raise NonFiniteError(
            f"{int(values['nonfinite'])} non-finite steps in a row (loss or gradient NaN/Inf) at "
            f"step {step}; stopping. Parameters were not updated by those steps and the last "
            f"saved checkpoint under {run.workdir}/checkpoints is intact. Lower the learning "
            "rate, check the data for empty completions, or use float32 compute."
        )


def _finish(run: Run, first_eval, final, seconds) -> dict:
    cfg, workdir = run.config, run.workdir
    policy = run.state.params["policy"]
    export = None
    if cfg.export.hf:  # every process takes part in the gathers; process 0 writes
        from mipo_jax.hf.export import save_pretrained

        export = os.path.join(workdir, "export")
        save_pretrained(
            nnx.merge(run.policy.graph, policy),
            export,
            tokenizer=run.tokenizer,
            dtype=cfg.export.dtype,
        )
    png = None
    if cfg.export.plot:
        png = plot(os.path.join(workdir, "metrics.jsonl"), os.path.join(workdir, "curves.png"))
    summary = {
        "algorithm": cfg.algorithm,
        "steps": run.num_steps,
        "seconds": round(seconds, 1),
        "skipped_steps": int(jax.device_get(run.state.skipped)),
        "reference": {"mode": cfg.reference.mode, "source": run.reference_source},
        "sft_export": _sft_export(cfg, workdir),
        "eval_before": first_eval,
        "eval_after": final,
        "metrics": os.path.join(workdir, "metrics.jsonl"),
        "tensorboard": os.path.join(workdir, "tensorboard"),
        "checkpoints": os.path.join(workdir, "checkpoints"),
        "export": export,
        "plot": png,
    }
    if jax.process_index() == 0:
        with open(os.path.join(workdir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
    return summary


__all__ = ["Metric", "NonFiniteError", "build", "compile_steps", "evaluate", "train", "jnp"]
