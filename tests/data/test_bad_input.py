"""Every bad-input class: 'error' names file, row and problem; 'skip' drops and counts.

One table case per reason of `mipo_jax.data.report.REASONS` (a test checks the table covers
them all): row-level reasons in `ROW_CASES`, whole-dataset ones in `DATASET_CASES`.
"""

import copy
import dataclasses
import json
import re

import numpy as np
import pytest

from mipo_jax.data import (
    BadInputError,
    Layout,
    Limits,
    PreferenceIterator,
    load_rows,
    tokenize_records,
    tokenize_rows,
)
from mipo_jax.data.embedded import load_tokenizer
from mipo_jax.data.report import DATASET_REASONS, REASONS

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


def refusing_template(tok):
    """chat_bpe whose template refuses system messages (a template that raises)."""
    tok = copy.deepcopy(tok)
    refuse = "{{ raise_exception('no system messages') }}"
    tok.chat_template = (
        "{% if messages[0]['role'] == 'system' %}" + refuse + "{% endif %}" + tok.chat_template
    )
    return tok


@dataclasses.dataclass(frozen=True)
class Case:
    """Row 1 of [good, bad, good, good] is bad for ``reason``; ``detail`` is the problem.

    ``alone``: the limits make every row of this format bad (a chat prompt is at least BOS
    plus the 3-token generation prompt), so the file is just [bad].
    """

    reason: str
    bad: object  # a row dict, or a raw str/bytes line
    detail: str  # regex of the problem as the message states it
    tok: str = "words"  # words | bpe | refuse
    limits: Limits | None = None
    good: dict | None = None  # default: GOOD (words) / CHAT_GOOD (bpe, refuse)
    alone: bool = False


NOT_UTF8 = b'{"prompt": "good \xff\xfe fun", "chosen": "great", "rejected": "dull"}'
KEEP_START = Limits(max_length=5, truncation_mode="keep_start")
REF = dict(GOOD, ref_chosen_logps=-1.0, ref_rejected_logps=-2.0)
ROW_CASES = [
    Case("malformed", '{"prompt": "good", "chosen": "great"', "line 2 is not valid JSON"),
    Case("undecodable", NOT_UTF8, "not valid UTF-8"),
    Case("null", {"prompt": "good", "chosen": None, "rejected": "dull"}, "chosen is null"),
    Case("null", {"prompt": "good", "rejected": "dull"}, "chosen is null or missing"),
    Case("empty", {"prompt": "good", "chosen": "great", "rejected": "   "}, "rejected is empty"),
    Case("wrong_type", {"prompt": "good", "chosen": 5, "rejected": "dull"}, "chosen must be a str"),
    Case("non_finite", dict(REF, ref_chosen_logps=float("nan")), "ref_chosen_logps is nan",
         good=REF),
    Case("identical", dict(GOOD, rejected="great"), "chosen and rejected are identical"),
    Case("template_error", dict(CHAT_GOOD, prompt=MSG("system", "Be brief.") + MSG("user", "Hi?")),
         "chat template failed: no system messages", tok="refuse"),
    Case("unknown_role", dict(CHAT_GOOD, prompt=MSG("usr", "Hi?")),
         r"prompt\[0\]\.role is 'usr'; the chat template knows \['system', 'user', 'assistant'\]",
         tok="bpe"),
    Case("empty_prompt", {"prompt": "", "chosen": "great", "rejected": "dull"},
         "the prompt has no tokens", tok="bpe", good=dict(GOOD, prompt="Hi")),
    Case("prompt_too_long", CHAT_GOOD, r"BOS/generation-prompt tokens \(5\) exceed the limit 3",
         tok="bpe", limits=Limits(max_prompt_length=3), alone=True),
    Case("empty_after_truncation", dict(GOOD, prompt="good fun bad dull"),
         "leaves no room for a completion within max_length=5 under truncation_mode='keep_start'",
         limits=KEEP_START, good=dict(GOOD, prompt="good fun bad")),
    Case("empty_after_truncation", CHAT_GOOD,  # keep_end: BOS + generation prompt fill it
         r"the prompt \(5 tokens, at least 1 kept\) leaves no room .*'keep_end'",
         tok="bpe", limits=Limits(max_length=4), alone=True),
    Case("identical_after_truncation", dict(GOOD, chosen="great fun", rejected="great bad"),
         "chosen and rejected are equal after truncation", limits=Limits(max_completion_length=1)),
]  # fmt: skip
DATASET_CASES = [  # (reason, lines of data.jsonl, detail)
    ("missing_column", [{"prompt": "good", "chosen": "great"}], r"columns \['chosen', 'prompt'\] "
     "match no TRL format"),
    ("empty_source", [], "the file is empty: no rows"),
    ("mixed_formats", [GOOD, CHAT_GOOD, GOOD], "row 0 is in string form and row 1 in "
     "conversational form"),
]  # fmt: skip


def test_the_table_has_a_case_for_every_reason():
    assert {c.reason for c in ROW_CASES} | {c[0] for c in DATASET_CASES} == set(REASONS)
    assert {c[0] for c in DATASET_CASES} == set(DATASET_REASONS)


@pytest.mark.parametrize(
    "case", ROW_CASES, ids=[f"{c.reason}-{i}" for i, c in enumerate(ROW_CASES)]
)
def test_each_bad_row_errors_or_is_skipped(tmp_path, words, bpe, case):
    """'error' names file, row and problem; 'skip' drops the row and counts it by reason."""
    tokenizer = {"words": words, "bpe": bpe, "refuse": refusing_template(bpe)}[case.tok]
    good = case.good or (GOOD if case.tok == "words" else CHAT_GOOD)
    path = jsonl(tmp_path, [case.bad] if case.alone else [good, case.bad, good, good])
    row = 0 if case.alone else 1
    kw = dict(limits=case.limits or Limits())
    with pytest.raises(BadInputError) as e:
        tokenize_rows(load_rows(path), tokenizer, **kw)
    assert re.fullmatch(
        rf"{re.escape(path)}: row {row}: {case.reason}: .*{case.detail}.* \(set bad_input="
        r"'skip' to drop such rows\)",
        str(e.value),
    ), str(e.value)
    assert e.value.row == row and e.value.reason == case.reason and e.value.source == path
    if case.alone:
        with pytest.raises(ValueError, match=rf"no usable rows(.|\n)*skipped +1  {case.reason}"):
            tokenize_rows(load_rows(path), tokenizer, bad_input="skip", **kw)
        return
    data = tokenize_rows(load_rows(path), tokenizer, bad_input="skip", **kw)
    assert data.report.skipped == {case.reason: 1} and data.report.examples[case.reason] == [1]
    assert list(data.example_id) == [0, 2, 3] and data.report.rows == 4 and data.report.kept == 3
    assert f"skipped      1  {case.reason}" in data.report.summary()


@pytest.mark.parametrize("reason,lines,detail", DATASET_CASES, ids=[c[0] for c in DATASET_CASES])
def test_each_dataset_problem_errors_under_both_policies(tmp_path, bpe, reason, lines, detail):
    """Whole-dataset problems name the file (and rows where there are some), never skip."""
    path = jsonl(tmp_path, lines)
    for policy in ("error", "skip"):
        with pytest.raises(BadInputError) as e:
            tokenize_rows(load_rows(path), bpe, bad_input=policy)
        assert re.fullmatch(rf"{re.escape(path)}: {reason}: .*{detail}.*", str(e.value)), str(
            e.value
        )
        assert e.value.row is None and e.value.reason == reason and "skip" not in str(e.value)


def test_mixed_formats_after_an_earlier_bad_row_reports_the_bad_row_first(tmp_path, bpe):
    path = jsonl(tmp_path, [GOOD, dict(GOOD, chosen=None), CHAT_GOOD])
    with pytest.raises(BadInputError, match=r"row 1: null: chosen is null"):
        tokenize_rows(load_rows(path), bpe)
    with pytest.raises(BadInputError, match=r"mixed_formats: row 0 is in string form and row 2"):
        tokenize_rows(load_rows(path), bpe, bad_input="skip")


def test_roles_a_template_names_are_known(bpe):
    """Roles beyond system/user/assistant are known when the template names them."""
    from mipo_jax.data.formats import template_roles

    tool = dict(CHAT_GOOD, prompt=MSG("user", "Hi?") + MSG("tool", "42"))
    with pytest.raises(BadInputError, match=r"row 0: unknown_role: prompt\[1\]\.role is 'tool'"):
        tokenize_records([tool], bpe)
    tok = copy.deepcopy(bpe)
    named = "{% for message in messages %}{% if message.role == 'tool' %}{% endif %}{% endfor %}"
    tok.chat_template = named + bpe.chat_template
    assert template_roles(tok.chat_template) == ("system", "user", "assistant", "tool")
    assert len(tokenize_records([tool], tok)) == 1
    llama = "{%- if message.role in ['ipython', 'tool'] %}{%- elif 'developer' == m['role'] %}"
    assert set(template_roles(llama)) == {"system", "user", "assistant", "ipython", "tool",
                                          "developer"}  # fmt: skip


def test_missing_column_of_an_explicit_format(tmp_path, words):
    path = jsonl(tmp_path, [{"prompt": "good", "chosen": "great"}])
    with pytest.raises(BadInputError, match=r"needs column\(s\) \['completion', 'label'\]"):
        tokenize_rows(load_rows(path), words, kind="unpaired")


def test_wrong_label(tmp_path, words):
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
