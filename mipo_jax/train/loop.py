"""The host loop of one training run: resume, step, report, evaluate, checkpoint, export.

    summary = train(config, workdir)

`mipo_jax.train.setup.build` makes everything once; the loop holds the train state. Each
step takes a host batch from the run's source, applies its transforms, runs the jitted
step, then the periodic work registered as hooks (`Hooks.add(fn, every=N)`: evaluation,
checkpoints). Step t+1 is dispatched before step t's metrics are fetched, so the host never
waits on the device to log. Writes ``metrics.jsonl``, TensorBoard events, ``checkpoints/``,
``export/`` (HF folder), ``curves.png`` and ``summary.json`` under the workdir.

Stages that come before a run (SFT, TIS-DPO's contrastive models) are runs of this loop
too, driven by `mipo_jax.train.stages`.
"""

import json
import logging
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mipo_jax import paths, stopping
from mipo_jax.checkpoint import Checkpointer, PreemptionGuard
from mipo_jax.train import state as st
from mipo_jax.train.data import to_device
from mipo_jax.train.evaluation import values
from mipo_jax.train.setup import Run, build
from mipo_jax.train.step import all_finite
from mipo_jax.train.writer import MetricWriter, plot

log = logging.getLogger("mipo_jax.train")


class NonFiniteError(RuntimeError):
    """Too many non-finite steps in a row; the message names the last checkpoint saved
    before them (no checkpoint is saved during a run of non-finite steps)."""


class Hooks:
    """Periodic work after a step: ``add(fn, every=N)`` runs ``fn(step, state)`` whenever
    ``step % N == 0`` (in the order added; ``every=0`` never)."""

    def __init__(self):
        self._hooks: list[tuple[object, int]] = []

    def add(self, fn, *, every: int = 1) -> None:
        self._hooks.append((fn, int(every)))

    def run(self, step: int, state) -> None:
        for fn, every in self._hooks:
            if every and step % every == 0:
                fn(step, state)


def train(config, workdir: str, **build_args) -> dict:
    """Train as configured; returns (and writes) a summary of the run.

    ``build_args`` (``init``, ``token_models``, ``train_data``, ``eval_data``): see
    `mipo_jax.train.setup.build`. A SIGTERM or SIGINT between steps stops at the next step,
    saves and returns ``{"stopped": reason, "step": n}`` (`mipo_jax.checkpoint.preemption`).
    """
    t0 = time.time()
    run, state = build(config, workdir, **build_args)
    with jax.set_mesh(run.mesh):  # jitted functions trace here: sharding constraints apply
        return _train(run, state, t0)


def _train(run: Run, state, t0: float) -> dict:
    config, workdir = run.config, run.workdir
    cfg = config
    ckpt = Checkpointer(
        paths.join(workdir, "checkpoints"),
        save_every=int(cfg.checkpoint.every),
        keep=int(cfg.checkpoint.keep),
        async_save=bool(cfg.checkpoint.async_save),
        config=cfg,
        metadata={"reference": {"mode": cfg.reference.mode, "source": run.reference_source}},
        restart=bool(cfg.checkpoint.get("restart", False)),
    )
    # The guard is entered first, so a signal while the checkpointer closes only sets a flag.
    with PreemptionGuard() as guard, ckpt:
        restored = ckpt.restore_or_none(st.abstract(state, run.state_shardings))
        start = 0
        if restored is not None:
            state, start = restored.state, int(restored.step)
            if restored.data_iter:
                run.source.set_state(restored.data_iter)
            log.info("resumed from %s at step %d", restored.path, start)
        writer = MetricWriter(workdir, start=start, end=run.num_steps)
        first_eval = None
        if start == 0 and run.evaluator.enabled:
            first_eval = run.evaluator(state)
            writer.write(0, first_eval, "eval")
        if jax.process_count() == 1 and guard.requested:  # before the first step: no save
            writer.close()
            log.warning("stopped (%s) before step %d; nothing new to save", guard.reason, start)
            return {"stopped": guard.reason, "step": start}
        reporter = _Reporter(run, writer, _progress(cfg, start, run.num_steps))
        saver = _Saver(ckpt, run)
        hooks = Hooks()
        every = int(cfg.train.eval_every)
        hooks.add(lambda s, x: s < run.num_steps and writer.write(s, run.evaluator(x), "eval"),
                  every=every)  # fmt: skip
        before = lambda: (reporter.flush(), writer.sync())  # a checkpoint's rows are written
        hooks.add(lambda s, x: ckpt.should_save(s) and saver.save(s, x, before=before))
        step, stopped = start, False
        for step in range(start, run.num_steps):
            host = run.source.next(step, state)
            for transform in run.transforms:
                host = transform(host, state, step)
            state, metrics = run.step_fn(state, to_device(host, run.batch_sharding), run.reference)
            reporter.push(step + 1, metrics, int(np.sum(np.asarray(host["segment_ids"]) > 0)))
            if reporter.nonfinite_run >= cfg.train.max_nonfinite:
                raise NonFiniteError(_nonfinite_message(run, ckpt, state, reporter))
            hooks.run(step + 1, state)
            if guard.should_stop(step + 1):
                stopped = True
                break
        reporter.flush()
        writer.sync()
        if reporter.nonfinite_run >= cfg.train.max_nonfinite:
            raise NonFiniteError(_nonfinite_message(run, ckpt, state, reporter))
        last = step + 1 if run.num_steps > start else start
        saver.save(last, state, force=True, wait=True)
        reporter.close()
        stopped = stopped or (jax.process_count() == 1 and guard.requested)
    if stopped:
        log.warning("stopped (%s) at step %d; checkpoint saved, exiting cleanly", guard.reason,
                    last)  # fmt: skip
        writer.close()
        return {"stopped": guard.reason, "step": last}
    stopping.check()  # outside the steps, a signal raises (`mipo_jax.stopping.job_signals`)
    final = run.evaluator(state)
    writer.write(run.num_steps, final, "eval")
    writer.close()
    return _finish(run, state, first_eval, final, time.time() - t0)


class _Saver:
    """Checkpoints only states whose last step was finite (no run of non-finite steps is
    saved: such a state holds the same parameters as the one before the run, and its
    counter would come back on resume) and whose values are all finite."""

    def __init__(self, ckpt: Checkpointer, run: Run):
        self.ckpt, self.run = ckpt, run
        self._ok = jax.jit(lambda x: (x.nonfinite == 0) & all_finite((x.params, x.aux)))

    def save(self, step: int, state, *, force=False, wait=False, before=None) -> bool:
        if not bool(self._ok(state)):
            log.warning("step %d: not saving a checkpoint (its last step was skipped as "
                        "non-finite)", step)  # fmt: skip
            if wait:
                self.ckpt.wait_until_finished()
            return False
        if before is not None:
            before()
        data_iter = self.run.source.get_state()
        return self.ckpt.save(step, state, data_iter=data_iter, force=force, wait=wait)


def _nonfinite_message(run: Run, ckpt: Checkpointer, state, reporter) -> str:
    n, end = reporter.nonfinite_run, reporter.last_step
    first = end - n + 1
    ckpt.wait_until_finished()
    saved = [s for s in ckpt.complete_steps() if s < first]
    where = paths.join(run.workdir, "checkpoints")
    if saved:
        last = f"The last checkpoint is step {saved[-1]} ({where}/{saved[-1]}), from before them"
    else:
        last = f"No checkpoint was saved before them (checkpoint.every={ckpt.save_every})"
    largest = max(float(jnp.max(jnp.abs(x))) for x in jax.tree.leaves(state.params))
    return (
        f"{n} non-finite steps in a row (loss, gradient or updated parameters NaN/Inf), steps "
        f"{first}-{end}; stopping. Those steps were skipped (parameters and optimiser state "
        f"left as they were; largest |parameter| now {largest:.3g}) and no checkpoint is "
        f"saved during non-finite steps. {last}. Lower the learning rate, check the data for "
        "empty completions, or use float32 compute."
    )


def _progress(cfg, start, total):
    if not cfg.train.progress or jax.process_index() != 0:
        return None
    from tqdm import tqdm

    return tqdm(
        total=total, initial=start, unit="step", dynamic_ncols=True, smoothing=0.1, mininterval=1.0
    )


class _Throughput:
    """Running steps/s and tokens/s, from the first fetched step on (its compilation is
    excluded: the clock starts when its metrics arrive).

    Rates are measured between *steady* fetches, those made right after the next step was
    dispatched: their spacing is one step's time whether dispatch is asynchronous (a fetch
    waits for step t) or effectively synchronous, as on CPU (step t + 1 already ran). Other
    fetches (before a checkpoint, after the last step) come with no step in between, so they
    carry the last rates instead of inflating them.
    """

    def __init__(self):
        self.t0, self.first, self.tokens, self.last = None, None, 0, {}

    def update(self, step: int, tokens: int, steady: bool = True) -> dict[str, float]:
        now = time.time()
        if self.first is None:
            if steady:
                self.t0, self.first = now, step
            return {}
        self.tokens += tokens
        if steady:
            dt = max(now - self.t0, 1e-9)
            self.last = {"steps_per_sec": (step - self.first) / dt,
                         "tokens_per_sec": self.tokens / dt}  # fmt: skip
        return dict(self.last)


class _Reporter:
    """Logs each step's metrics one step behind dispatch (the host never waits on the step
    it just dispatched), except before a checkpoint: ``flush`` writes the pending row, so a
    checkpoint's step always has its row in ``metrics.jsonl`` (a resume rewrites none)."""

    def __init__(self, run: Run, writer, bar):
        self.run, self.writer, self.bar = run, writer, bar
        self.clock = _Throughput()
        self.pending = None
        self.nonfinite_run, self.last_step = 0, 0

    def push(self, step: int, metrics, tokens: int) -> None:
        self.flush(steady=True)  # the previous step's metrics, right after this dispatch
        self.pending = (step, metrics, tokens)

    def flush(self, steady: bool = False) -> None:
        if self.pending is None:
            return
        step, metrics, tokens = self.pending
        self.pending = None
        vals = values(metrics)
        vals.update(self.clock.update(step, tokens, steady))
        cfg = self.run.config.train
        if cfg.log_every and step % cfg.log_every == 0:
            self.writer.write(step, vals)
        if self.bar is not None:
            self.bar.update(1)
            acc = vals.get("rewards/accuracies", 0.0)
            tok_s = vals.get("tokens_per_sec", 0.0)
            self.bar.set_postfix(loss=f"{vals['loss']:.4f}", acc=f"{acc:.2f}",
                                 tok_s=f"{tok_s:,.0f}")  # fmt: skip
        self.nonfinite_run, self.last_step = int(vals["nonfinite"]), step

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _finish(run: Run, state, first_eval, final, seconds) -> dict:
    cfg, workdir = run.config, run.workdir
    export = None
    if cfg.export.hf:  # every process takes part in the gathers; process 0 writes
        from mipo_jax.hf.export import save_pretrained

        export = paths.join(workdir, "export")
        model = nnx.merge(run.policy.graph, run.policy_params(state))
        save_pretrained(model, export, tokenizer=run.tokenizer, dtype=cfg.export.dtype)
    png = None
    if cfg.export.plot:
        png = plot(paths.join(workdir, "metrics.jsonl"), paths.join(workdir, "curves.png"))
    summary = {
        "algorithm": cfg.algorithm,
        "steps": run.num_steps,
        "seconds": round(seconds, 1),
        "skipped_steps": int(jax.device_get(state.skipped)),
        "reference": {"mode": cfg.reference.mode, "source": run.reference_source},
        "data": run.data_reports,
        "eval_before": first_eval,
        "eval_after": final,
        "metrics": paths.join(workdir, "metrics.jsonl"),
        "tensorboard": paths.join(workdir, "tensorboard"),
        "checkpoints": paths.join(workdir, "checkpoints"),
        "export": export,
        "plot": png,
    }
    if jax.process_index() == 0:  # atomically: its presence marks a finished stage
        paths.write_text(paths.join(workdir, "summary.json"), json.dumps(summary, indent=2))
    return summary
