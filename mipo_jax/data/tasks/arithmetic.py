"""The arithmetic task: ``a+b=`` / ``a-b=`` with 0 <= a, b <= 99, checkable answers.

Chosen is the correct answer; rejected is a wrong answer drawn from a known mistake model
(`MISTAKES`: a forgotten carry or borrow, off by one, one wrong digit, a wrong sign), so the
data carries both a verifiable reward (`check`) for pass@k and the kind of near-miss that
entropy-controlled DPO (H-DPO) studies care about. Train and test problems are disjoint
(`split_of`).
"""

from __future__ import annotations

import numpy as np

OPS = ("+", "-")
MISTAKES = {"carry": 0.35, "off_by_one": 0.3, "digit": 0.25, "sign": 0.1}
TEST_FRACTION = 0.1
SPLIT_SEED = 1234


def answer(a: int, op: str, b: int) -> int:
    return a + b if op == "+" else a - b


def prompt(a: int, op: str, b: int) -> str:
    return f"{a}{op}{b}="


def problems() -> list[tuple[int, str, int]]:
    return [(a, op, b) for op in OPS for a in range(100) for b in range(100)]


def split_of() -> dict[tuple[int, str, int], str]:
    """A fixed 90/10 train/test split of all 20,000 problems."""
    probs = problems()
    test = set(
        np.random.default_rng(SPLIT_SEED).permutation(len(probs))[: int(TEST_FRACTION * len(probs))]
    )
    return {p: ("test" if i in test else "train") for i, p in enumerate(probs)}


def wrong_answer(rng: np.random.Generator, a: int, op: str, b: int) -> tuple[int, str]:
    """(a wrong answer, the mistake's name), drawn from `MISTAKES`."""
    right = answer(a, op, b)
    names, probs = list(MISTAKES), np.array(list(MISTAKES.values()))
    while True:
        kind = names[int(rng.choice(len(names), p=probs))]
        if kind == "carry":
            if op == "+" and a % 10 + b % 10 >= 10:
                wrong = right - 10
            elif op == "-" and a % 10 < b % 10:
                wrong = right + 10
            else:
                continue
        elif kind == "off_by_one":
            wrong = right + int(rng.choice([-1, 1]))
        elif kind == "digit":
            digits = list(str(abs(right)))
            j = int(rng.integers(len(digits)))
            digits[j] = str(int(rng.integers(10)))
            wrong = int("".join(digits)) * (-1 if right < 0 else 1)
        else:  # sign
            if right == 0:
                continue
            wrong = -right
        if wrong != right:
            return wrong, kind


def check(prompt_text: str, completion: str) -> bool:
    """Whether ``completion`` (decoded, EOS stripped) is the right answer to ``prompt_text``."""
    body = prompt_text.strip().removesuffix("=")
    op_at = max(body.rfind("+"), body.rfind("-", 1))
    a, op, b = int(body[:op_at]), body[op_at], int(body[op_at + 1 :])
    try:
        return int(completion.strip()) == answer(a, op, b)
    except ValueError:
        return False


def generate(split: str, n: int, seed: int) -> list[dict]:
    """``n`` rows of one split (one pair per problem, problems drawn without replacement)."""
    rng = np.random.default_rng(seed)
    pool = [p for p, s in split_of().items() if s == split]
    rows = []
    for j in rng.permutation(len(pool))[:n]:
        a, op, b = pool[int(j)]
        wrong, kind = wrong_answer(rng, a, op, b)
        rows.append(
            {
                "prompt": prompt(a, op, b),
                "chosen": str(answer(a, op, b)),
                "rejected": str(wrong),
                "answer": answer(a, op, b),
                "mistake": kind,
            }
        )
    return rows
