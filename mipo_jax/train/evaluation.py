"""Held-out evaluation: the loss's metrics on eval batches, and exact task metrics.

Every evaluation scores the same batches (the eval split's first ``eval_batches``), so eval
curves compare across steps and a resumed run evaluates as an uninterrupted one. On the
embedded controlled tasks, the policy's distribution over each held-out prompt's finite
completion set gives the true expected reward and the KLs exactly (`task_eval`); the
reference's scores are computed once, when the evaluator is built (before any step).

Both functions are compiled once per run.
"""

import functools

import jax

from mipo_jax.train import task_eval
from mipo_jax.train.data import fetch, to_device
from mipo_jax.train.scoring import Scorer, sequence_logps
from mipo_jax.train.state import replicated
from mipo_jax.train.step import eval_step


def values(metrics) -> dict[str, float]:
    """``{name: Metric}`` (device) → ``{name: float}``."""
    return {k: float(m.value) for k, m in jax.device_get(metrics).items()}


class Evaluator:
    """``evaluator(state) -> {metric: value}``; empty when the run has nothing to evaluate.

    Args:
      data: the eval split (`StepData`) or None; ``num_batches`` of it are scored.
      transforms: the run's batch transforms (policy samples, token weights), applied to
        eval batches as to train batches (with step -1).
      reference: the frozen live reference's params, or None (cached log-probs come with
        the batches; a moving reference is read from ``state.aux``).
      task: an exact evaluator (`task_eval.make`) or None; ``initial_policy``: params
        scored as the reference of the exact metrics when the run has no frozen live
        reference.
    """

    def __init__(
        self,
        spec,
        state_shardings,
        batch_sharding,
        *,
        data,
        num_batches: int,
        transforms,
        reference,
        ref_shardings,
        task,
        scorer: Scorer,
        initial_policy,
    ):
        self.data, self.num_batches = data, int(num_batches)
        self.transforms, self.reference = tuple(transforms), reference
        self.sharding, self.task = batch_sharding, task
        self.fn = jax.jit(
            functools.partial(eval_step, spec=spec),
            in_shardings=(state_shardings.params, batch_sharding, ref_shardings),
            out_shardings=replicated(batch_sharding.mesh),
        )
        self.task_ref = None
        if task is not None:
            self._score = jax.jit(functools.partial(sequence_logps, scorer=scorer))
            ref = reference if reference is not None else initial_policy
            self.task_ref = task.logprobs(self._scores(ref))

    @property
    def enabled(self) -> bool:
        return (self.data is not None and self.num_batches > 0) or self.task is not None

    def _scores(self, params):
        return lambda b: fetch(self._score(params, to_device(b, self.sharding, whole=True)))

    def __call__(self, state) -> dict[str, float]:
        out: dict[str, float] = {}
        if self.data is not None and self.num_batches > 0:
            self.data.set_state({"epoch": 0, "step": 0})
            ref = state.aux.get("reference", self.reference)
            total = None
            for _ in range(self.num_batches):
                batch = next(self.data)
                for transform in self.transforms:
                    batch = transform(batch, state, -1)
                m = self.fn(state.params, to_device(batch, self.sharding), ref)
                total = m if total is None else {k: total[k] + m[k] for k in m}
            out.update(values(total))
        if self.task is not None:
            policy = self.task.logprobs(self._scores(state.params["policy"]))
            metrics = self.task.metrics(policy, self.task_ref)
            out.update({f"true/{k}": v for k, v in metrics.items()})
        return out


def make_task(config, tokenizer):
    """The exact evaluation of an embedded task with a finite answer set (controlled,
    length_biased, arithmetic), when the config trains on one (`task_eval.make`)."""
    if config.train.task_eval_prompts:
        return task_eval.make(config.data.source, tokenizer, config.train.task_eval_prompts)
    return None
