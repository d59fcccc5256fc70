"""Exact evaluation on the embedded controlled tasks (true reward, exact KL).

For a few held-out prompts, every completion of the task's finite completion set is scored
by the model (summed log-probs of ``completion + EOS``); the model's distribution restricted
to that set and renormalised gives, exactly, the expected true reward E_π[r] and the KL to
any other model scored the same way (`mipo_jax.data.tasks.sentiment.exact_metrics`).
"""

import numpy as np

from mipo_jax.data.encoding import tokenize_records
from mipo_jax.data.load import load_rows
from mipo_jax.data.tasks import sentiment
from mipo_jax.train import step_batch

TASKS = {"embedded:controlled": "controlled", "embedded:length_biased": "length_biased"}


class TaskEval:
    """Score all completions for ``num_prompts`` test prompts; compare models exactly."""

    def __init__(self, source: str, tokenizer, num_prompts: int = 8, batch_size: int = 1024):
        self.task = TASKS[source]
        rows = load_rows(source, split="test")
        prompts, seen = [], set()
        for _, row in rows.iter(0, len(rows)):
            words = sentiment.parse_prompt(row["prompt"])
            if words[-1] not in seen or len(seen) == len(sentiment.WORDS):
                seen.add(words[-1])
                prompts.append(words)
            if len(prompts) == num_prompts:
                break
        self.prompts = prompts
        ys = sentiment.completions(self.task)
        records = [
            {"prompt": sentiment.text(p), "completion": " " + sentiment.text(y), "label": True}
            for p in prompts
            for y in ys
        ]
        self.data = tokenize_records(records, tokenizer, kind="unpaired")
        if len(self.data) != len(records):
            raise ValueError("the task's completions did not all tokenise")
        p_len, c_len = self.data.lengths()
        self.width = int(-(-c_len.max() // 8) * 8)
        self.length = int(-(-(p_len + c_len[:, 0]).max() // 8) * 8)
        self.batch_size, self.num = batch_size, len(ys)
        tables = [sentiment.tables(self.task, p) for p in prompts]
        self.task_ref = np.stack([t[0] for t in tables])  # [prompts, completions]
        self.reward = np.stack([t[1] for t in tables])

    def batches(self):
        n = len(self.data)
        for lo in range(0, n, self.batch_size):
            idx = np.arange(lo, min(lo + self.batch_size, n))
            b = step_batch.padded_examples(
                self.data, idx, max_length=self.length, max_completion=self.width
            )
            yield len(idx), step_batch.pad_groups(b, self.batch_size)

    def logprobs(self, score) -> np.ndarray:
        """Renormalised log π over the completion set, ``[prompts, completions]``.

        ``score(batch) -> [G, 1]`` summed log-probs of a padded batch (one side).
        """
        out = [np.asarray(score(b))[:n, 0] for n, b in self.batches()]
        lp = np.concatenate(out).reshape(len(self.prompts), self.num)
        return np.stack([sentiment.renormalise(row) for row in lp])

    def metrics(self, policy: np.ndarray, reference: np.ndarray | None = None) -> dict:
        """Mean over prompts of E_π[r], KL(π‖task π_ref) and, if given, KL(π‖reference)."""
        out = {"reward": [], "kl_task_ref": [], "kl_ref": []}
        for i in range(len(self.prompts)):
            m = sentiment.exact_metrics(policy[i], self.task_ref[i], self.reward[i])
            out["reward"].append(m["reward"])
            out["kl_task_ref"].append(m["kl"])
            if reference is not None:
                out["kl_ref"].append(
                    sentiment.exact_metrics(policy[i], reference[i], self.reward[i])["kl"]
                )
        return {k: float(np.mean(v)) for k, v in out.items() if v}

    def baselines(self, alpha: float) -> dict:
        """E[r] of the task's π_ref and of the KL-regularised optimum at β = alpha."""
        opt = np.stack(
            [
                sentiment.optimal_logprobs(self.task_ref[i], self.reward[i], alpha)
                for i in range(len(self.prompts))
            ]
        )
        return {
            "task_ref_reward": self.metrics(self.task_ref)["reward"],
            "optimum_reward": self.metrics(opt)["reward"],
            "optimum_kl": self.metrics(opt)["kl_task_ref"],
        }
