"""Every bad-input class: 'error' names file, row and problem; 'skip' drops and counts."""

import json

import numpy as np
import pytest

from mipo_jax.data import (
    BadInputError,
    Layout,
    Limits,
    PreferenceIterator,
    load_rows,
    tokenize_rows,
)
from mipo_jax.data.embedded import load_tokenizer

GOOD = {"prompt": "good fun", "chosen": "great", "rejected": "dull"}
MSG = lambda role, text: [{"role": role, "content": text}]  # noqa: E731
CHAT_GOOD = {
    "prompt": MSG("user", "Hi?"),
    "chosen": MSG("assistant", "Hello."),
    "rejected": MSG("assistant", "Go."),
}


@pytest.fixture(scope="module")
def words():
    return load_tokenizer("toy_words")


@pytest.fixture(scope="module")
def bpe():
    return load_tokenizer("chat_bpe")


def jsonl(tmp_path, lines: list) -> str:
    """A JSONL file; str lines are written as given (bytes allowed), dicts as JSON."""
    path = tmp_path / "data.jsonl"
    with open(path, "wb") as f:
        for line in lines:
            raw = (
                line
                if isinstance(line, bytes)
                else (line if isinstance(line, str) else json.dumps(line)).encode()
            )
            f.write(raw + b"\n")
    return str(path)


# (reason, the bad row (dict, raw str/bytes line), tokenizer, limits)
NOT_UTF8 = b'{"prompt": "good \xff\xfe fun", "chosen": "great", "rejected": "dull"}'
KEEP_START = Limits(max_length=5, truncation_mode="keep_start")
CASES = [
    ("malformed", '{"prompt": "good", "chosen": "great"', "words", None),
    ("undecodable", NOT_UTF8, "words", None),
    ("null", {"prompt": "good", "chosen": None, "rejected": "dull"}, "words", None),
    ("null", {"prompt": "good", "rejected": "dull"}, "words", None),  # key missing in this row
    ("empty", {"prompt": "good", "chosen": "great", "rejected": "   "}, "words", None),
    ("wrong_type", {"prompt": "good", "chosen": 5, "rejected": "dull"}, "words", None),
    ("identical", {"prompt": "good", "chosen": "great", "rejected": "great"}, "words", None),
    ("empty_prompt", {"prompt": "", "chosen": "great", "rejected": "dull"}, "bpe", None),
    ("empty_after_truncation", dict(GOOD, prompt="good fun bad dull"), "words", KEEP_START),
    ("identical_after_truncation", dict(GOOD, chosen="great fun", rejected="great bad"), "words",
     Limits(max_completion_length=1)),
]  # fmt: skip


@pytest.mark.parametrize(
    "reason,bad,tok,limits", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)]
)
def test_each_bad_row_errors_or_is_skipped(tmp_path, words, bpe, reason, bad, tok, limits):
    tokenizer = {"words": words, "bpe": bpe}[tok]
    good = dict(GOOD, prompt="good fun bad") if reason == "empty_after_truncation" else GOOD
    good = dict(good, prompt="Hi") if tok == "bpe" else good
    path = jsonl(tmp_path, [good, bad, good, good])
    kw = dict(limits=limits or Limits())
    with pytest.raises(BadInputError, match=rf"data\.jsonl: row 1: {reason}: ") as e:
        tokenize_rows(load_rows(path), tokenizer, **kw)
    assert e.value.row == 1 and e.value.reason == reason and "bad_input='skip'" in str(e.value)
    data = tokenize_rows(load_rows(path), tokenizer, bad_input="skip", **kw)
    assert data.report.skipped == {reason: 1} and data.report.examples[reason] == [1]
    assert list(data.example_id) == [0, 2, 3] and data.report.rows == 4 and data.report.kept == 3
    assert f"skipped      1  {reason}" in data.report.summary()


def test_missing_column_always_errors_with_the_file(tmp_path, words):
    path = jsonl(tmp_path, [{"prompt": "good", "chosen": "great"}])
    for policy in ("error", "skip"):
        with pytest.raises(BadInputError, match=r"data\.jsonl: missing_column: .*columns"):
            tokenize_rows(load_rows(path), words, bad_input=policy)
    with pytest.raises(BadInputError, match=r"needs column\(s\) \['completion', 'label'\]"):
        tokenize_rows(load_rows(path), words, kind="unpaired")


def test_non_finite_reference_and_wrong_label(tmp_path, words):
    rows = [
        dict(GOOD, ref_chosen_logps=-1.0, ref_rejected_logps=-2.0),
        dict(GOOD, ref_chosen_logps=float("nan"), ref_rejected_logps=-2.0),
    ]
    with pytest.raises(BadInputError, match="row 1: non_finite: ref_chosen_logps is nan"):
        tokenize_rows(load_rows(jsonl(tmp_path, rows)), words)
    unpaired = [
        {"prompt": "good", "completion": "fun", "label": True},
        {"prompt": "good", "completion": "fun", "label": "yes"},
    ]
    with pytest.raises(BadInputError, match="row 1: wrong_type: label must be a bool"):
        tokenize_rows(load_rows(jsonl(tmp_path, unpaired)), words)


def test_undecodable_bytes_in_csv(tmp_path, words):
    path = tmp_path / "data.csv"
    path.write_bytes(b"prompt,chosen,rejected\ngood,great,dull\ngood \xff,great,dull\n")
    with pytest.raises(BadInputError, match=r"data\.csv: row 1: undecodable"):
        tokenize_rows(load_rows(str(path)), words)


def test_bad_messages(tmp_path, bpe):
    no_role = dict(CHAT_GOOD, chosen=[{"content": "Hello."}])
    mixed = dict(CHAT_GOOD, rejected="Go.")
    for row, match in (
        (no_role, "chosen\\[0\\] must be a {role, content} message"),
        (mixed, "rejected must be a list"),
    ):
        with pytest.raises(BadInputError, match=f"row 1: wrong_type: {match}"):
            tokenize_rows(load_rows(jsonl(tmp_path, [CHAT_GOOD, row])), bpe)


def test_template_error_and_prompt_too_long(tmp_path):
    tok = load_tokenizer("chat_bpe")
    refuse = "{{ raise_exception('no system messages') }}"
    tok.chat_template = (
        "{% if messages[0]['role'] == 'system' %}" + refuse + "{% endif %}" + tok.chat_template
    )
    system = dict(CHAT_GOOD, prompt=MSG("system", "Be brief.") + MSG("user", "Hi?"))
    path = jsonl(tmp_path, [CHAT_GOOD, system])
    with pytest.raises(
        BadInputError, match="row 1: template_error: chat template failed: no system messages"
    ):
        tokenize_rows(load_rows(path), tok)
    data = tokenize_rows(load_rows(path), tok, bad_input="skip")
    assert data.report.skipped == {"template_error": 1}
    # the generation prompt '<|im_start|>assistant\n' (3 tokens) plus BOS cannot fit in 3
    with pytest.raises(BadInputError, match="row 0: prompt_too_long"):
        tokenize_rows(load_rows(path), tok, limits=Limits(max_prompt_length=3))


def test_no_all_masked_completion_reaches_the_loss(words):
    """Under every truncation setting, each valid slot has >= 1 mask token on both sides."""
    rows = load_rows("embedded:controlled", split="test")
    for limits in (
        Limits(max_length=6),
        Limits(max_length=7, truncation_mode="keep_start"),
        Limits(max_completion_length=1),
    ):
        data = tokenize_rows(rows, words, limits=limits, bad_input="skip")
        for layout in (
            Layout("padded", batch_size=32),
            Layout("shared_prompt", rows=4, row_length=32),
        ):
            for b in PreferenceIterator(data, layout, num_epochs=1, drop_remainder=False):
                n = b["mask"].sum(axis=-1)  # [G, P, S]
                valid = b["pair_valid"] > 0
                assert (n[valid] >= 1).all() and (n[~valid] == 0).all()
                np.testing.assert_array_equal(b["example_id"][~valid], -1)
