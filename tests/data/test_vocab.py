"""`check_vocab`: a model whose vocabulary misses ids the data or the tokenizer uses is refused.

Issue 12, item 2: an ``hf:`` model with a smaller vocabulary than the tokenizer's ids ran to
the end with every loss NaN and every step skipped.
"""

import copy
import logging

import pytest

from mipo_jax.data import tokenize_records
from mipo_jax.data.embedded import load_tokenizer
from mipo_jax.data.vocab import VocabularyError, check_vocab, special_ids, vocab_size_of
from mipo_jax.models import ModelConfig

ROWS = [
    {"prompt": "What is the capital of France?", "chosen": " Paris.", "rejected": " Lyon."},
    {"prompt": "Say hi", "chosen": " Hi!", "rejected": " Go away."},
]


@pytest.fixture(scope="module")
def bpe():
    return load_tokenizer("chat_bpe")  # 1024 tokens, specials 0..2


def model(vocab: int) -> ModelConfig:
    return ModelConfig("llama", vocab, 32, 64, 2, 4, 2, 8)


def test_accepts_a_model_that_covers_the_tokenizer(bpe):
    data = tokenize_records(ROWS, bpe)
    check_vocab(model(len(bpe)), bpe, data)
    check_vocab({"vocab_size": len(bpe) + 64}, bpe, data)  # an HF config.json dict
    assert vocab_size_of(model(7)) == 7 == vocab_size_of({"vocab_size": 7}) == vocab_size_of(7)


def test_refuses_data_ids_beyond_the_vocabulary_naming_both_sizes(bpe):
    data = tokenize_records(ROWS, bpe)
    top = int(max(data.prompt.values.max(), *(c.values.max() for c in data.completions)))
    with pytest.raises(VocabularyError) as e:
        check_vocab(model(top), bpe, data, name="model.init=hf:org/tiny")
    text = str(e.value)
    assert f"model.init=hf:org/tiny has vocab_size={top}, the tokenizer has 1024 tokens" in text
    assert f"token id {top} of records: row " in text and "data.tokenizer" in text
    check_vocab(model(top + 1), bpe, data)  # exactly enough


def test_refuses_special_tokens_beyond_the_vocabulary(bpe):
    """Even when no row uses it: BOS/EOS/PAD and added specials reach the model."""
    tok = copy.deepcopy(bpe)
    tok.add_special_tokens({"pad_token": "<|pad|>"})
    assert special_ids(tok)["pad token '<|pad|>'"] == 1024
    data = tokenize_records(ROWS, tok)
    with pytest.raises(VocabularyError, match=r"token id 1024 of pad token '<\|pad\|>'"):
        check_vocab(model(1024), tok, data)


def test_a_larger_tokenizer_whose_used_ids_fit_only_warns(bpe, caplog):
    data = tokenize_records(ROWS, bpe)
    top = int(max(data.prompt.values.max(), *(c.values.max() for c in data.completions)))
    with caplog.at_level(logging.WARNING, logger="mipo_jax.data"):
        check_vocab(model(top + 1), bpe, data)
    assert f"vocab_size={top + 1}, the tokenizer has 1024 tokens" in caplog.text
