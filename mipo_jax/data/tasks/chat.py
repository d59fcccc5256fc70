"""A small conversational preference set in chat format (for SmolLM2-135M-Instruct).

Every prompt has a checkable right answer, so the preference is never a matter of taste:
the chosen reply is correct (and, for ``one_sentence``, follows the system instruction);
the rejected reply is a plausible mistake. Task types (`TASKS`): capitals, addition,
hours to minutes, letters in a word, opposites, and "answer in one sentence" (the rejected
reply is right but rambles). About a third of the prompts have a system message and a
quarter are two-turn conversations whose first exchange is correct.
"""

from __future__ import annotations

import numpy as np

CAPITALS = {
    "France": ("Paris", "Lyon"), "Germany": ("Berlin", "Munich"), "Italy": ("Rome", "Milan"),
    "Spain": ("Madrid", "Barcelona"), "Portugal": ("Lisbon", "Porto"),
    "Japan": ("Tokyo", "Osaka"), "Canada": ("Ottawa", "Toronto"),
    "Australia": ("Canberra", "Sydney"), "Brazil": ("Brasilia", "Rio de Janeiro"),
    "Egypt": ("Cairo", "Alexandria"), "Kenya": ("Nairobi", "Mombasa"),
    "India": ("New Delhi", "Mumbai"), "China": ("Beijing", "Shanghai"),
    "Russia": ("Moscow", "Saint Petersburg"), "Turkey": ("Ankara", "Istanbul"),
    "Switzerland": ("Bern", "Zurich"), "Nigeria": ("Abuja", "Lagos"),
    "Morocco": ("Rabat", "Casablanca"), "New Zealand": ("Wellington", "Auckland"),
    "Norway": ("Oslo", "Bergen"), "Sweden": ("Stockholm", "Gothenburg"),
    "Poland": ("Warsaw", "Krakow"), "Greece": ("Athens", "Thessaloniki"),
    "Vietnam": ("Hanoi", "Ho Chi Minh City"), "South Korea": ("Seoul", "Busan"),
    "Scotland": ("Edinburgh", "Glasgow"), "Pakistan": ("Islamabad", "Karachi"),
    "Colombia": ("Bogota", "Medellin"), "Ireland": ("Dublin", "Cork"),
    "Austria": ("Vienna", "Salzburg"),
}  # fmt: skip
OPPOSITES = {
    "hot": ("cold", "warm"), "big": ("small", "large"), "fast": ("slow", "quick"),
    "happy": ("sad", "glad"), "up": ("down", "over"), "early": ("late", "soon"),
    "light": ("dark", "bright"), "open": ("closed", "wide"), "full": ("empty", "whole"),
    "strong": ("weak", "tough"), "old": ("young", "ancient"), "loud": ("quiet", "noisy"),
    "wet": ("dry", "damp"), "rich": ("poor", "wealthy"), "hard": ("soft", "tough"),
}  # fmt: skip
WORDS = (
    "apple banana cherry orange window garden pencil rocket planet silver yellow purple "
    "mountain river castle dragon python keyboard elephant giraffe"
).split()
SYSTEMS = ("You are a helpful assistant.", "You are a careful assistant. Be accurate.")
ONE_SENTENCE = "Answer in one sentence."
TASKS = ("capital", "addition", "minutes", "letters", "opposite", "one_sentence")


def _qa(rng: np.random.Generator, task: str) -> tuple[str, str, str, str]:
    """(question, right reply, wrong reply, answer) for one task type."""
    if task in ("capital", "one_sentence"):
        country = list(CAPITALS)[int(rng.integers(len(CAPITALS)))]
        right, near = CAPITALS[country]
        q = f"What is the capital of {country}?"
        good = f"The capital of {country} is {right}."
        if task == "one_sentence":
            bad = (
                f"That is a great question! Many people think of {near} first. "
                f"However, the capital of {country} is {right}. I hope this helps!"
            )
        else:
            bad = f"The capital of {country} is {near}."
        return q, good, bad, right
    if task == "addition":
        a, b = (int(x) for x in rng.integers(2, 60, 2))
        wrong = a + b + int(rng.choice([-10, -1, 1, 10]))
        return (
            f"What is {a} plus {b}?",
            f"{a} plus {b} is {a + b}.",
            f"{a} plus {b} is {wrong}.",
            str(a + b),
        )
    if task == "minutes":
        h = int(rng.integers(2, 13))
        wrong = int(rng.choice([100 * h, 60 * h + 10, 60 * h - 10]))
        q = f"How many minutes are in {h} hours?"
        return (
            q,
            f"There are {60 * h} minutes in {h} hours.",
            f"There are {wrong} minutes in {h} hours.",
            str(60 * h),
        )
    if task == "letters":
        w = WORDS[int(rng.integers(len(WORDS)))]
        wrong = len(w) + int(rng.choice([-1, 1]))
        q = f'How many letters are in the word "{w}"?'
        return (
            q,
            f'The word "{w}" has {len(w)} letters.',
            f'The word "{w}" has {wrong} letters.',
            str(len(w)),
        )
    w = list(OPPOSITES)[int(rng.integers(len(OPPOSITES)))]
    right, near = OPPOSITES[w]
    q = f'What is the opposite of "{w}"?'
    return q, f'The opposite of "{w}" is "{right}".', f'The opposite of "{w}" is "{near}".', right


def generate(n: int, seed: int) -> list[dict]:
    """``n`` conversational preference rows (explicit prompt, one assistant message each)."""
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n):
        task = TASKS[int(rng.integers(len(TASKS)))]
        q, good, bad, ans = _qa(rng, task)
        messages = []
        if task == "one_sentence":
            messages.append({"role": "system", "content": ONE_SENTENCE})
        elif rng.random() < 0.3:
            messages.append({"role": "system", "content": SYSTEMS[int(rng.integers(len(SYSTEMS)))]})
        if rng.random() < 0.25:
            q0, good0, _, _ = _qa(rng, TASKS[int(rng.integers(len(TASKS) - 1))])
            messages += [{"role": "user", "content": q0}, {"role": "assistant", "content": good0}]
        messages.append({"role": "user", "content": q})
        rows.append(
            {
                "prompt": messages,
                "chosen": [{"role": "assistant", "content": good}],
                "rejected": [{"role": "assistant", "content": bad}],
                "task": task,
                "answer": ans,
            }
        )
    return rows
