"""Embedded datasets and tokenizers: reproducible, offline, and exact where they claim to be."""

import json

import numpy as np
import pytest

from mipo_jax.data.embedded import (
    ASSETS,
    EMBEDDED,
    EMBEDDED_TOKENIZERS,
    embedded_path,
    load_tokenizer,
)
from mipo_jax.data.tasks import arithmetic, sentiment


def read(name, split="train"):
    return [json.loads(line) for line in open(embedded_path(name, split))]


def test_generation_reproduces_the_shipped_files():
    from experiments.data import generate

    assert generate.main(["--check"]) == 0


def test_assets_are_small_and_load_offline_as_fast_tokenizers():
    from transformers import PreTrainedTokenizerFast

    assert all(f.stat().st_size < 1_000_000 for f in ASSETS.rglob("*") if f.is_file())
    for name in EMBEDDED_TOKENIZERS:
        tok = PreTrainedTokenizerFast.from_pretrained(str(ASSETS / "tokenizers" / name))
        assert (
            isinstance(load_tokenizer(name), PreTrainedTokenizerFast)
            and tok.eos_token_id is not None
        )
    for name in EMBEDDED:
        assert (ASSETS / "datasets" / name / "README.md").read_text().count("<!-- stats -->") == 1


@pytest.mark.parametrize("task", sentiment.TASKS)
def test_sentiment_reference_and_rewards_are_exact(task):
    for prompt in [(0,), (5, 7)]:
        ref, r = sentiment.tables(task, prompt)
        assert np.isclose(np.logaddexp.reduce(ref), 0.0, atol=1e-12)  # π_ref is normalised
        ref_m = sentiment.exact_metrics(ref, ref, r)
        opt = sentiment.exact_metrics(sentiment.optimal_logprobs(ref, r, 0.5), ref, r)
        assert ref_m["kl"] == 0.0 and opt["reward"] > ref_m["reward"] and opt["kl"] > 0
        # π* maximises E[r] - β KL: no other policy (here: π_ref tilted at other β) beats it
        score = lambda m: m["reward"] - 0.5 * m["kl"]  # noqa: E731
        for beta in (0.25, 1.0, 2.0):
            other = sentiment.exact_metrics(sentiment.optimal_logprobs(ref, r, beta), ref, r)
            assert score(opt) > score(other)
    ys = {y: j for j, y in enumerate(sentiment.completions(task))}
    for row in read(task)[:200]:  # the file's columns are the exact values
        prompt = sentiment.parse_prompt(row["prompt"])
        ref, r = sentiment.tables(task, prompt)
        for key in ("chosen", "rejected"):
            y = ys[sentiment.parse_prompt(row[key])]
            assert row[f"ref_{key}_logps"] == pytest.approx(ref[y], abs=1e-9)
            assert row[f"{key}_reward"] == r[y]


def test_length_biased_labeller_prefers_longer_answers():
    rows = read("length_biased")
    longer = np.mean([len(r["chosen"].split()) > len(r["rejected"].split()) for r in rows])
    shorter = np.mean([len(r["chosen"].split()) < len(r["rejected"].split()) for r in rows])
    assert longer > 1.5 * shorter


def test_arithmetic_answers_check_and_splits_are_disjoint():
    train, test = read("arithmetic"), read("arithmetic", "test")
    for row in train[:500] + test[:100]:
        assert arithmetic.check(row["prompt"], row["chosen"]) and not arithmetic.check(
            row["prompt"], row["rejected"]
        )
        assert int(row["chosen"]) == row["answer"]
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in test}
    assert arithmetic.check("12-15=", " -3") and not arithmetic.check("12-15=", "three")


def test_chat_rows_are_conversational_with_correct_answers():
    for row in read("chat", "test"):
        assert row["prompt"][-1]["role"] == "user" and row["chosen"][0]["role"] == "assistant"
        assert row["answer"] in row["chosen"][0]["content"] and row["chosen"] != row["rejected"]
