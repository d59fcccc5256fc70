"""The controlled task and its length-biased variant: a known reference, a known reward.

In the spirit of the DPO paper's IMDb experiment (Rafailov et al. 2023, §6.1), but with a
generating distribution we know exactly, so a policy's true reward and its KL to the
reference are sums over a finite set of completions rather than estimates.

Words: 4 positive (``good great fun lovely``, sentiment +1) and 4 negative
(``bad dull awful boring``, sentiment -1). A prompt is 2-4 uniformly drawn words (the
start of a "review") and the separator ``:``, so that a model can tell where the completion
starts. The reference policy π_ref is a Markov chain over words,
``M[u, v] = (STAY if class(u) == class(v) else 1 - STAY) * WITHIN[v]``, started from the
prompt's last word, so it continues in the prompt's mood with probability ``STAY``.

* ``controlled``: completions are exactly 4 words (then EOS, probability 1); the true reward
  is the summed sentiment r(y) = Σ_t s(y_t) ∈ {-4, ..., 4}; labels are Bradley-Terry with
  P(y1 ≻ y2) = σ(r(y1) - r(y2)).
* ``length_biased``: 1-4 words; after each of words 1-3 π_ref stops (emits EOS) with
  probability ``STOP``; the true reward is the mean sentiment r(y) = mean_t s(y_t) ∈ [-1, 1]
  (length-neutral), but the labeller scores r(y) + ``LENGTH_BONUS`` · |y|, so it prefers
  longer answers (the SimPO / R-DPO length-exploitation setting).

Log-probabilities are over tokens ``words + [EOS]``, as the model sees them. The policy a
language model defines is taken restricted to this task's completion set and renormalised
(`renormalise`), which makes expected reward and KL exact finite sums (`exact_metrics`).
The β-regularised optimum π*(y|x) ∝ π_ref(y|x)·exp(r(x, y)/β) is `optimal_logprobs`.
"""

from __future__ import annotations

import functools
import itertools

import numpy as np

POSITIVE = ("good", "great", "fun", "lovely")
NEGATIVE = ("bad", "dull", "awful", "boring")
WORDS = POSITIVE + NEGATIVE
SENTIMENT = np.array([1.0] * 4 + [-1.0] * 4)
WITHIN = np.array([0.4, 0.3, 0.2, 0.1] * 2)  # word frequencies within a class
STAY = 0.7
STOP = 0.4
MAX_WORDS = 4
PROMPT_WORDS = (2, 3, 4)
LENGTH_BONUS = 0.5
SEPARATOR = ":"
TASKS = ("controlled", "length_biased")


def transition() -> np.ndarray:
    """``M[u, v]``: P(next word v | word u); rows sum to 1."""
    same = SENTIMENT[:, None] == SENTIMENT[None, :]
    return np.where(same, STAY, 1.0 - STAY) * WITHIN[None, :]


@functools.cache
def completions(task: str) -> tuple[tuple[int, ...], ...]:
    """The finite completion set, as word-index tuples, in a fixed order."""
    lengths = [MAX_WORDS] if task == "controlled" else range(1, MAX_WORDS + 1)
    return tuple(y for n in lengths for y in itertools.product(range(len(WORDS)), repeat=n))


def ref_logprob(task: str, prompt: tuple[int, ...], y: tuple[int, ...]) -> float:
    """log π_ref(y | x) over tokens ``y + [EOS]``."""
    m = transition()
    prev = (prompt[-1],) + tuple(y[:-1])
    lp = float(np.sum(np.log(m[list(prev), list(y)])))
    if task == "length_biased":
        lp += (len(y) - 1) * np.log(1.0 - STOP)
        lp += np.log(STOP) if len(y) < MAX_WORDS else 0.0
    return lp


def reward(task: str, y: tuple[int, ...]) -> float:
    """The true reward r(x, y) (it does not depend on the prompt)."""
    s = SENTIMENT[list(y)]
    return float(s.sum() if task == "controlled" else s.mean())


def labeller_score(task: str, y: tuple[int, ...]) -> float:
    """What the Bradley-Terry labeller compares: the true reward, plus a length bonus."""
    bonus = LENGTH_BONUS * len(y) if task == "length_biased" else 0.0
    return reward(task, y) + bonus


def tables(task: str, prompt: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """(log π_ref, r) over `completions(task)`, in that order (read-only arrays)."""
    return _tables(task, int(prompt[-1]))  # π_ref depends on the prompt's last word only


@functools.cache
def _tables(task: str, last: int) -> tuple[np.ndarray, np.ndarray]:
    ys = completions(task)
    ref = np.array([ref_logprob(task, (last,), y) for y in ys])
    r = np.array([reward(task, y) for y in ys])
    ref.flags.writeable = r.flags.writeable = False
    return ref, r


def renormalise(logprobs: np.ndarray) -> np.ndarray:
    """A policy's log-probs over the completion set, renormalised to sum to one."""
    return logprobs - np.logaddexp.reduce(logprobs)


def optimal_logprobs(ref: np.ndarray, r: np.ndarray, beta: float) -> np.ndarray:
    """log π*(y|x) ∝ log π_ref(y|x) + r(x, y)/β (the KL-regularised optimum)."""
    return renormalise(ref + r / beta)


def exact_metrics(policy: np.ndarray, ref: np.ndarray, r: np.ndarray) -> dict[str, float]:
    """E_π[r] and KL(π ‖ π_ref), exactly, for one prompt (log-prob tables over the set)."""
    p = np.exp(policy)
    return {"reward": float(p @ r), "kl": float(p @ (policy - ref))}


def sample_completion(rng: np.random.Generator, task: str, prompt: tuple[int, ...]):
    """One draw from π_ref(· | prompt)."""
    m = transition()
    y = [int(rng.choice(len(WORDS), p=m[prompt[-1]]))]
    while len(y) < MAX_WORDS:
        if task == "length_biased" and rng.random() < STOP:
            break
        y.append(int(rng.choice(len(WORDS), p=m[y[-1]])))
    return tuple(y)


def text(words: tuple[int, ...]) -> str:
    return " ".join(WORDS[w] for w in words)


def generate(task: str, n: int, seed: int) -> list[dict]:
    """``n`` preference rows: prompt, chosen, rejected, exact ref log-probs, true rewards."""
    rng = np.random.default_rng(seed)
    rows = []
    while len(rows) < n:
        prompt = tuple(int(w) for w in rng.integers(0, len(WORDS), rng.choice(PROMPT_WORDS)))
        y1, y2 = sample_completion(rng, task, prompt), sample_completion(rng, task, prompt)
        if y1 == y2:
            continue
        margin = labeller_score(task, y1) - labeller_score(task, y2)
        if rng.random() >= 1.0 / (1.0 + np.exp(-margin)):
            y1, y2 = y2, y1
        rows.append(
            {
                "prompt": text(prompt) + " " + SEPARATOR,
                "chosen": " " + text(y1),
                "rejected": " " + text(y2),
                "ref_chosen_logps": round(ref_logprob(task, prompt, y1), 9),
                "ref_rejected_logps": round(ref_logprob(task, prompt, y2), 9),
                "chosen_reward": reward(task, y1),
                "rejected_reward": reward(task, y2),
            }
        )
    return rows


def parse_prompt(prompt: str) -> tuple[int, ...]:
    """Word indices of a prompt string (for evaluation code); the separator is dropped."""
    return tuple(WORDS.index(w) for w in prompt.split() if w != SEPARATOR)
