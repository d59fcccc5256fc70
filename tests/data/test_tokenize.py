"""Token boundaries: one BOS, one EOS, completion-only masks, truncation that keeps both."""

import json

import numpy as np
import pytest

from mipo_jax.data import Limits, tokenize_records, tokenize_rows
from mipo_jax.data.embedded import load_tokenizer
from mipo_jax.data.encoding import tokenizer_adds_bos
from mipo_jax.data.load import load_rows
from mipo_jax.data.packing import assemble_padded


@pytest.fixture(scope="module")
def words():
    return load_tokenizer("toy_words")


@pytest.fixture(scope="module")
def bpe():
    return load_tokenizer("chat_bpe")


def ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def test_exactly_one_bos_where_the_tokenizer_wants_one(words, bpe):
    assert tokenizer_adds_bos(words) and not tokenizer_adds_bos(bpe)
    rows = [
        {"prompt": "good fun", "chosen": "great", "rejected": "bad"},
        {"prompt": "<bos> good fun", "chosen": "great", "rejected": "bad"},  # BOS in the text
        {"prompt": "<bos> <bos> dull", "chosen": "great <eos>", "rejected": "bad"},
    ]
    data = tokenize_records(rows, words)
    bos, eos = words.bos_token_id, words.eos_token_id
    for i in range(3):
        prompt = list(data.prompt[i])
        assert prompt[0] == bos and prompt.count(bos) == 1
        for side in range(2):
            comp = list(data.completions[side][i])
            assert comp[-1] == eos and comp.count(eos) == 1 and bos not in comp
    assert list(data.prompt[0]) == words("good fun")["input_ids"]  # = the tokenizer's own BOS
    assert list(data.prompt[1]) == list(data.prompt[0])
    # without a tokenizer BOS nothing is added
    plain = tokenize_records(rows[:1], bpe)
    assert list(plain.prompt[0]) == ids(bpe, "good fun")


def chat_rows():
    return [json.loads(line) for line in open(load_rows("embedded:chat", split="test").source)][:24]


def check_against_template(tok, rows):
    data = tokenize_records(rows, tok)
    eos = tok.eos_token_id
    for i, row in enumerate(rows):
        prompt = tok.apply_chat_template(row["prompt"], add_generation_prompt=True)["input_ids"]
        assert list(data.prompt[i]) == list(prompt)
        for side, key in enumerate(("chosen", "rejected")):
            full = list(tok.apply_chat_template(row["prompt"] + row[key])["input_ids"])
            ours = list(data.prompt[i]) + list(data.completions[side][i])
            # the template's own tokens, up to and including the EOS that ends the reply
            assert ours == full[: full.index(eos, len(prompt)) + 1]
            assert tok.decode(full[len(ours) :]) == "\n"  # all we leave out: the newline after EOS
    return data


def test_chat_boundaries_match_apply_chat_template(bpe):
    data = check_against_template(bpe, chat_rows())
    batch = assemble_padded(data, np.arange(4), 4, 256, 64)
    for j in range(4):  # the loss reads exactly the completion tokens, EOS included
        for side in range(2):
            n = int(batch["mask"][j, 0, side].sum())
            np.testing.assert_array_equal(
                batch["targets"][j, 0, side, :n], data.completions[side][j]
            )
            row = batch["tokens"][j, side]
            np.testing.assert_array_equal(
                row[batch["pred_index"][j, 0, side, :n] - side * 256 + 1], data.completions[side][j]
            )


@pytest.mark.slow
def test_chat_boundaries_match_smollm2_template():
    """SmolLM2-135M-Instruct's real tokenizer (from the GGUF; ~10 s on first use)."""
    pytest.importorskip("gguf")
    check_against_template(load_tokenizer("smollm2"), chat_rows()[:8])


def test_chat_bpe_carries_smollm2_template_and_specials(bpe):
    from experiments.data.toy_tokenizers import SMOL_TEMPLATE

    assert bpe.chat_template == SMOL_TEMPLATE
    assert (bpe.bos_token, bpe.eos_token, bpe.pad_token) == (
        "<|im_start|>",
        "<|im_end|>",
        "<|im_end|>",
    )


def lengths(data, i):
    return len(data.prompt[i]), len(data.completions[0][i]), len(data.completions[1][i])


ROW = {"prompt": "good fun bad dull awful", "chosen": "great great fun", "rejected": "bad"}


def test_truncation_keep_end_drops_prompt_start_but_keeps_bos(words):
    data = tokenize_records([ROW], words, limits=Limits(max_length=7))
    assert lengths(data, 0) == (3, 4, 2)  # 6 prompt tokens -> BOS + last 2 words
    assert words.decode(data.prompt[0]) == "<bos> dull awful"
    assert data.report.truncated["prompt"] == 1 and data.report.tokens_dropped["prompt"] == 3


def test_truncation_keep_start_drops_completion_ends(words):
    data = tokenize_records([ROW], words, limits=Limits(max_length=8, truncation_mode="keep_start"))
    assert lengths(data, 0) == (6, 2, 2)
    assert words.eos_token_id not in data.completions[0][0]  # a cut completion has no EOS
    assert data.report.truncated == {"chosen": 1}


def test_max_prompt_and_completion_length(words):
    limits = Limits(max_prompt_length=2, max_completion_length=3)
    data = tokenize_records([ROW], words, limits=limits)
    assert words.decode(data.prompt[0]) == "<bos> awful"
    assert lengths(data, 0) == (2, 3, 2)
    start = tokenize_records(
        [ROW], words, limits=Limits(max_prompt_length=2, truncation_mode="keep_start")
    )
    assert words.decode(start.prompt[0]) == "<bos> good"


def test_chat_truncation_keeps_the_generation_prompt(bpe):
    row = chat_rows()[0]
    full = tokenize_records([row], bpe)
    tail = ids(bpe, "<|im_start|>assistant\n")
    assert list(full.prompt[0][-len(tail) :]) == tail
    for mode in ("keep_end", "keep_start"):
        cut = tokenize_records(
            [row], bpe, limits=Limits(max_prompt_length=12, truncation_mode=mode)
        )
        p = list(cut.prompt[0])
        assert len(p) == 12 and p[-len(tail) :] == tail and p[0] == bpe.bos_token_id
        body, n = full.prompt[0][1 : -len(tail)], 12 - 1 - len(tail)
        np.testing.assert_array_equal(
            p[1 : -len(tail)], body[:n] if mode == "keep_start" else body[-n:]
        )


def test_truncation_counts_over_a_dataset(words):
    rows = load_rows("embedded:controlled", split="test")
    data = tokenize_rows(rows, words, limits=Limits(max_length=8))
    p, c = data.lengths()
    assert (p[:, None] + c).max() <= 8 and (p >= 1).all() and (c >= 1).all()
    p0, _ = tokenize_rows(rows, words).lengths()
    assert data.report.truncated["prompt"] == int((p0 > 3).sum()) > 0  # 4- and 5-token prompts
    assert data.report.tokens_dropped["prompt"] == int((p0 - p).sum())
    assert "truncated" in data.report.summary()


def test_chat_truncation_drops_whole_turns_first(bpe):
    turns = next(r["prompt"] for r in chat_rows() if len(r["prompt"]) >= 3)  # two-turn
    system = turns[:1] if turns[0]["role"] == "system" else []
    last = system + turns[-1:]  # what remains after dropping the earlier exchange
    row = {"prompt": turns, "chosen": CHAT_REPLY, "rejected": CHAT_WRONG}
    want = bpe.apply_chat_template(last, add_generation_prompt=True)["input_ids"]
    full = tokenize_records([row], bpe).prompt[0]
    assert len(full) > len(want)
    data = tokenize_records([row], bpe, limits=Limits(max_prompt_length=len(want)))
    assert list(data.prompt[0]) == list(want)
    assert data.report.tokens_dropped["prompt"] == len(full) - len(want)


CHAT_REPLY = [{"role": "assistant", "content": "Yes."}]
CHAT_WRONG = [{"role": "assistant", "content": "No."}]


def test_eos_token_override(bpe):
    data = tokenize_records(
        [{"prompt": "Hi", "chosen": " a", "rejected": " b"}], bpe, eos_token="<|endoftext|>"
    )
    assert data.completions[0][0][-1] == bpe.convert_tokens_to_ids("<|endoftext|>")
    with pytest.raises(ValueError, match="not a single token"):
        tokenize_records(
            [{"prompt": "Hi", "chosen": " a", "rejected": " b"}], bpe, eos_token="<|eot|>"
        )
