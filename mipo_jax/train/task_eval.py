"""Exact evaluation on the embedded tasks with a finite answer set.

For a few held-out prompts, every completion of the task's finite completion set is scored
by the model (summed log-probs of ``completion + EOS``); the model's distribution restricted
to that set and renormalised gives, exactly, the expected true reward E_π[r] and the KL to
any other model scored the same way (`mipo_jax.data.tasks.sentiment.exact_metrics`).

* ``controlled`` / ``length_biased`` (`TaskEval`): E_π[r], KL(π ‖ task π_ref) and KL to the
  run's reference; on ``length_biased`` also the expected length E_π|y| (words) and the
  correlation, under the reference, of the implicit reward log π/π_ref with |y|.
* ``arithmetic`` (`ArithmeticEval`): the candidate set is every integer a result can take
  (−99…198); P_π(correct), the entropy of the answer distribution, pass@k = 1 − (1 − p)^k
  (k independent samples, exact given p) and KL to the reference.

`make` builds the right one for a source (None for other sources).
"""

import numpy as np

from mipo_jax.data.encoding import tokenize_records
from mipo_jax.data.load import load_rows
from mipo_jax.data.tasks import arithmetic, sentiment
from mipo_jax.train import step_batch

TASKS = {"embedded:controlled": "controlled", "embedded:length_biased": "length_biased"}
ARITHMETIC = "embedded:arithmetic"
SOURCES = (*TASKS, ARITHMETIC)  # sources with an exact evaluation
PASS_AT = (1, 4, 16)


def make(source: str, tokenizer, num_prompts: int):
    """The exact evaluator of ``source`` (`TaskEval` or `ArithmeticEval`), or None."""
    if source in TASKS:
        return TaskEval(source, tokenizer, num_prompts)
    if source == ARITHMETIC:
        return ArithmeticEval(tokenizer, num_prompts)
    return None


class _Scored:
    """Records scored in a fixed order: [prompts, candidates] summed log-probs."""

    def _prepare(self, records, tokenizer, num: int, batch_size: int) -> None:
        self.data = tokenize_records(records, tokenizer, kind="unpaired")
        if len(self.data) != len(records):
            raise ValueError("the task's completions did not all tokenise")
        p_len, c_len = self.data.lengths()
        self.width = int(-(-c_len.max() // 8) * 8)
        self.length = int(-(-(p_len + c_len[:, 0]).max() // 8) * 8)
        self.batch_size, self.num = batch_size, num

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


class TaskEval(_Scored):
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
        self._prepare(records, tokenizer, len(ys), batch_size)
        self.lengths = np.array([len(y) for y in ys], dtype=float)  # words
        tables = [sentiment.tables(self.task, p) for p in prompts]
        self.task_ref = np.stack([t[0] for t in tables])  # [prompts, completions]
        self.reward = np.stack([t[1] for t in tables])

    def metrics(self, policy: np.ndarray, reference: np.ndarray | None = None) -> dict:
        """Mean over prompts of E_π[r], KL(π‖task π_ref) and, if given, KL(π‖reference);
        on ``length_biased`` also E_π|y| (``length``) and, given a reference, the
        reference-weighted correlation of log π/π_ref with |y| (``length_corr``)."""
        out = {"reward": [], "kl_task_ref": [], "kl_ref": [], "length": [], "length_corr": []}
        biased = self.task == "length_biased"
        for i in range(len(self.prompts)):
            m = sentiment.exact_metrics(policy[i], self.task_ref[i], self.reward[i])
            out["reward"].append(m["reward"])
            out["kl_task_ref"].append(m["kl"])
            if biased:
                out["length"].append(float(np.exp(policy[i]) @ self.lengths))
            if reference is not None:
                out["kl_ref"].append(
                    sentiment.exact_metrics(policy[i], reference[i], self.reward[i])["kl"]
                )
                if biased:
                    implicit = policy[i] - reference[i]
                    out["length_corr"].append(
                        weighted_corr(implicit, self.lengths, np.exp(reference[i]))
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


def weighted_corr(a: np.ndarray, b: np.ndarray, w: np.ndarray) -> float:
    """Pearson correlation of ``a`` and ``b`` under the weights ``w`` (0 if one is constant)."""
    w = w / w.sum()
    da, db = a - w @ a, b - w @ b
    va, vb = w @ (da * da), w @ (db * db)
    if va <= 0 or vb <= 0:
        return 0.0
    return float((w @ (da * db)) / np.sqrt(va * vb))


class ArithmeticEval(_Scored):
    """Exact answer-distribution metrics on ``num_prompts`` held-out arithmetic problems.

    The candidates are every value a result can take, −99…198, written as the data writes
    answers (``str(n)``); the model's distribution restricted to them and renormalised gives
    P_π(correct), the entropy H(π) of the answer, pass@k = 1 − (1 − P_π(correct))^k (k
    independent samples from that distribution) and KL to the reference, exactly. The mass
    the model puts on other strings is not counted (it is renormalised away).
    """

    CANDIDATES = tuple(range(-99, 199))

    def __init__(self, tokenizer, num_prompts: int = 8, batch_size: int = 1024):
        rows = load_rows(ARITHMETIC, split="test")
        self.prompts = [row["prompt"] for _, row in rows.iter(0, min(num_prompts, len(rows)))]
        records = [
            {"prompt": p, "completion": str(n), "label": True}
            for p in self.prompts
            for n in self.CANDIDATES
        ]
        self._prepare(records, tokenizer, len(self.CANDIDATES), batch_size)
        self.correct = np.array(
            [[arithmetic.check(p, str(n)) for n in self.CANDIDATES] for p in self.prompts]
        )  # [prompts, candidates] bool; one True per row

    def metrics(self, policy: np.ndarray, reference: np.ndarray | None = None) -> dict:
        """Means over prompts of ``p_correct``, ``entropy`` (nats), ``pass@k`` for
        ``PASS_AT``, ``greedy`` (the argmax is correct) and, if given, ``kl_ref``."""
        return answer_metrics(policy, self.correct, reference)


def answer_metrics(policy: np.ndarray, correct: np.ndarray, reference=None) -> dict:
    """`ArithmeticEval.metrics` on log-prob tables ``[prompts, candidates]`` (rows sum to 1
    in probability) and a boolean ``correct`` table of the same shape."""
    p = np.exp(policy)
    p_correct = np.sum(p * correct, axis=1)
    out = {
        "p_correct": float(np.mean(p_correct)),
        "entropy": float(np.mean(-np.sum(p * policy, axis=1))),
        "greedy": float(np.mean(correct[np.arange(len(p)), np.argmax(policy, axis=1)])),
    }
    for k in PASS_AT:
        out[f"pass@{k}"] = float(np.mean(1.0 - (1.0 - p_correct) ** k))
    if reference is not None:
        out["kl_ref"] = float(np.mean(np.sum(p * (policy - reference), axis=1)))
    return out
