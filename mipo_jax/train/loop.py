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
import os
import time

import jax
import numpy as np
from flax import nnx

from mipo_jax.checkpoint import Checkpointer, PreemptionGuard
from mipo_jax.train import state as st
from mipo_jax.train.data import to_device
from mipo_jax.train.evaluation import values
from mipo_jax.train.setup import Run, build
from mipo_jax.train.writer import MetricWriter, plot

log = logging.getLogger("mipo_jax.train")


class NonFiniteError(RuntimeError):
    """Too many non-finite steps in a row; the last saved checkpoint is intact."""


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
    `mipo_jax.train.setup.build`.
    """
    t0 = time.time()
    run, state = build(config, workdir, **build_args)
    with jax.set_mesh(run.mesh):  # jitted functions trace here: sharding constraints apply
        return _train(run, state, t0)


def _train(run: Run, state, t0: float) -> dict:
    config, workdir = run.config, run.workdir
    cfg = config
    ckpt = Checkpointer(
        os.path.join(workdir, "checkpoints"),
        save_every=int(cfg.checkpoint.every),
        keep=int(cfg.checkpoint.keep),
        async_save=bool(cfg.checkpoint.async_save),
        config=cfg,
        metadata={"reference": {"mode": cfg.reference.mode, "source": run.reference_source}},
    )
    restored = ckpt.restore_or_none(st.abstract(state, run.state_shardings))
    start = 0
    if restored is not None:
        state, start = restored.state, int(restored.step)
        if restored.data_iter:
            run.source.set_state(restored.data_iter)
        log.info("resumed from %s at step %d", restored.path, start)
    writer = MetricWriter(workdir)
    first_eval = None
    if start == 0 and run.evaluator.enabled:
        first_eval = run.evaluator(state)
        writer.write(0, first_eval, "eval")
    hooks = Hooks()
    every = int(cfg.train.eval_every)
    hooks.add(lambda s, x: s < run.num_steps and writer.write(s, run.evaluator(x), "eval"),
              every=every)  # fmt: skip
    hooks.add(lambda s, x: ckpt.save(s, x, data_iter=run.source.get_state()))
    bar = _progress(cfg, start, run.num_steps)
    pending, step, clock = None, start, _Throughput()
    stopped = False
    with ckpt, PreemptionGuard() as guard:
        for step in range(start, run.num_steps):
            host = run.source.next(step, state)
            for transform in run.transforms:
                host = transform(host, state, step)
            state, metrics = run.step_fn(state, to_device(host, run.batch_sharding), run.reference)
            if pending is not None:
                _report(run, writer, bar, pending, clock)
            pending = (step + 1, metrics, int(np.sum(np.asarray(host["segment_ids"]) > 0)))
            hooks.run(step + 1, state)
            if guard.should_stop(step + 1):
                stopped = True
                break
        if pending is not None:
            _report(run, writer, bar, pending, clock)
        last = step + 1 if run.num_steps > start else start
        ckpt.save(last, state, data_iter=run.source.get_state(), force=True, wait=True)
    if bar is not None:
        bar.close()
    if stopped:
        log.warning("stopped by SIGTERM at step %d; checkpoint saved, exiting cleanly", step + 1)
        writer.close()
        return {"stopped": "preempted", "step": step + 1}
    final = run.evaluator(state)
    writer.write(run.num_steps, final, "eval")
    writer.close()
    return _finish(run, state, first_eval, final, time.time() - t0)


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
    vals = values(metrics)
    vals.update(clock.update(tokens))
    cfg = run.config.train
    if cfg.log_every and step % cfg.log_every == 0:
        writer.write(step, vals)
    if bar is not None:
        bar.update(1)
        acc = vals.get("rewards/accuracies", 0.0)
        tok_s = vals.get("tokens_per_sec", 0.0)
        bar.set_postfix(loss=f"{vals['loss']:.4f}", acc=f"{acc:.2f}", tok_s=f"{tok_s:,.0f}")
    if vals["nonfinite"] >= cfg.max_nonfinite:
        raise NonFiniteError(
            f"{int(vals['nonfinite'])} non-finite steps in a row (loss or gradient NaN/Inf) at "
            f"step {step}; stopping. Parameters were not updated by those steps and the last "
            f"saved checkpoint under {run.workdir}/checkpoints is intact. Lower the learning "
            "rate, check the data for empty completions, or use float32 compute."
        )


def _finish(run: Run, state, first_eval, final, seconds) -> dict:
    cfg, workdir = run.config, run.workdir
    export = None
    if cfg.export.hf:  # every process takes part in the gathers; process 0 writes
        from mipo_jax.hf.export import save_pretrained

        export = os.path.join(workdir, "export")
        model = nnx.merge(run.policy.graph, run.policy_params(state))
        save_pretrained(model, export, tokenizer=run.tokenizer, dtype=cfg.export.dtype)
    png = None
    if cfg.export.plot:
        png = plot(os.path.join(workdir, "metrics.jsonl"), os.path.join(workdir, "curves.png"))
    summary = {
        "algorithm": cfg.algorithm,
        "steps": run.num_steps,
        "seconds": round(seconds, 1),
        "skipped_steps": int(jax.device_get(state.skipped)),
        "reference": {"mode": cfg.reference.mode, "source": run.reference_source},
        "data": run.data_reports,
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
