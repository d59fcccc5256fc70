"""Truncation never empties a prompt: every completion token is predicted from its own sequence.

Issue 12, item 1: with a tokenizer that adds no BOS (chat_bpe, SmolLM2's, Qwen's), keep_end
truncation of a row whose completion is far longer than max_length emptied the prompt and
kept the row, so the chosen's first token was predicted from index -1 (another sequence).
"""

import dataclasses

import numpy as np
import pytest

from mipo_jax.data import BadInputError, Layout, Limits, PreferenceIterator, tokenize_records
from mipo_jax.data.embedded import load_tokenizer
from mipo_jax.data.encoding import tokenizer_adds_bos
from mipo_jax.data.ragged import Ragged

LONG = " ".join(["word"] * 60)
ROWS = [
    {"prompt": "Hi there, my friend", "chosen": LONG, "rejected": " short"},
    {"prompt": "Hello to you all", "chosen": " yes", "rejected": LONG},
]
LAYOUTS = (
    Layout("padded", batch_size=2),
    Layout("pairs", rows=2, row_length=64),
    Layout("shared_prompt", rows=2, row_length=64),
)


def no_bos_tokenizer(name):
    tok = load_tokenizer({"qwen_like": "chat_bpe"}.get(name, name))
    if name == "qwen_like":
        tok.bos_token = None  # Qwen2/2.5 tokenizers have no BOS token at all
    return tok


def check_predictors(data, layout):
    """Each completion token's predictor is the token before it in its own sequence."""
    for b in PreferenceIterator(data, layout, num_epochs=1, drop_remainder=False):
        flat = b["tokens"].reshape(b["tokens"].shape[0], -1)
        seg = b["segment_ids"].reshape(flat.shape)
        for g, p in zip(*np.nonzero(b["pair_valid"])):
            i = list(data.example_id).index(int(b["example_id"][g, p]))
            for s in range(data.num_completions):
                n = int(b["mask"][g, p, s].sum())
                where = b["pred_index"][g, p, s, :n]
                assert (where >= 0).all() and (seg[g, where] > 0).all()
                before = [data.prompt[i][-1], *b["targets"][g, p, s, : n - 1]]
                np.testing.assert_array_equal(flat[g, where], before)


@pytest.mark.parametrize("name", ["chat_bpe", "smollm2", "qwen_like"])
def test_keep_end_keeps_one_prompt_token_without_bos(name):
    tok = no_bos_tokenizer(name)
    assert not tokenizer_adds_bos(tok)
    for max_length in (2, 3, 8, 16):
        data = tokenize_records(ROWS, tok, limits=Limits(max_length=max_length))
        assert len(data) == 2
        np.testing.assert_array_equal(data.prompt.lengths, [1, 1])  # the prompt's last token
        prompt_ids = tok(ROWS[0]["prompt"], add_special_tokens=False)["input_ids"]
        assert list(data.prompt[0]) == prompt_ids[-1:]
        _, comp = data.lengths()
        assert comp.max() == max_length - 1 and comp.min() >= 1
        assert data.report.truncated["prompt"] == 2
        for layout in LAYOUTS:
            check_predictors(data, layout)


def test_no_room_for_a_prompt_and_a_completion_token_is_bad_input():
    tok = load_tokenizer("chat_bpe")
    with pytest.raises(BadInputError, match=r"row 0: empty_after_truncation: .*'keep_end'"):
        tokenize_records(ROWS, tok, limits=Limits(max_length=1))
    with pytest.raises(
        ValueError, match=r"no usable rows(.|\n)*skipped +2  empty_after_truncation"
    ):
        tokenize_records(ROWS, tok, limits=Limits(max_length=1), bad_input="skip")


def test_rows_that_fit_are_truncated_as_before():
    """Rows with room for their prompt's tail keep exactly max_length - longest tokens of it."""
    tok = load_tokenizer("chat_bpe")
    row = {"prompt": " ".join(["hello"] * 20), "chosen": " yes", "rejected": " no no"}
    full = tokenize_records([row], tok)
    longest = max(len(c[0]) for c in full.completions)
    data = tokenize_records([row], tok, limits=Limits(max_length=longest + 5))
    assert list(data.prompt[0]) == list(full.prompt[0][-5:])
    assert [list(c[0]) for c in data.completions] == [list(c[0]) for c in full.completions]


def test_iterator_refuses_an_empty_prompt():
    """Defence in depth: a Tokenized built elsewhere (sampling rounds) cannot slip one in."""
    data = tokenize_records(ROWS, load_tokenizer("chat_bpe"))
    empty = dataclasses.replace(data, prompt=Ragged.from_lists([[], list(data.prompt[1])]))
    with pytest.raises(ValueError, match="example 0 has an empty prompt"):
        PreferenceIterator(empty, LAYOUTS[0])
