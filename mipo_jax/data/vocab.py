"""`check_vocab`: every token id the data and the tokenizer's special tokens use fits the model.

An id ``>= vocab_size`` does not fail loudly in JAX: an embedding gather out of range
returns garbage or NaN, so every loss is NaN and every step is skipped. The trainer calls
this once the model config and the tokenised splits exist, before the first step.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import numpy as np

from mipo_jax.data.encoding import Tokenized

log = logging.getLogger("mipo_jax.data")


class VocabularyError(ValueError):
    """Token ids that the model's embedding table does not have."""


def vocab_size_of(model: Any) -> int:
    """``vocab_size`` of a `ModelConfig`, an HF config dict or an int."""
    if isinstance(model, Mapping):
        return int(model["vocab_size"])
    return int(getattr(model, "vocab_size", model))


def special_ids(tokenizer) -> dict[str, int]:
    """Named special token ids of ``tokenizer`` (BOS, EOS, PAD and every other special)."""
    out = {}
    for name in ("bos", "eos", "pad", "unk"):
        i = getattr(tokenizer, f"{name}_token_id", None)
        if i is not None:
            out[f"{name} token {getattr(tokenizer, f'{name}_token')!r}"] = int(i)
    for token, i in zip(tokenizer.all_special_tokens, tokenizer.all_special_ids):
        if i is not None:
            out.setdefault(f"special token {token!r}", int(i))
    return out


def check_vocab(model: Any, tokenizer, *splits: Tokenized, name: str = "the model") -> None:
    """Raise `VocabularyError` if a special token or a token of ``splits`` is ``>= vocab_size``.

    Args:
      model: the model's `ModelConfig` (or HF config dict, or the vocab size).
      tokenizer: the tokenizer the data was tokenised with.
      *splits: the tokenised splits (train, eval) that will reach the model.
      name: how the message names the model (e.g. ``model.init=hf:org/name``).

    A tokenizer larger than the model whose ids in the data all fit only logs a warning.
    """
    vocab = vocab_size_of(model)
    sizes = f"{name} has vocab_size={vocab}, the tokenizer has {len(tokenizer)} tokens"
    fix = "use the model's own tokenizer (data.tokenizer) or a model with a larger vocabulary"
    bad = {what: i for what, i in special_ids(tokenizer).items() if i >= vocab}
    for data in splits:
        if data.pad_id >= vocab:
            bad.setdefault(f"padding id of {data.report.source}", int(data.pad_id))
        for part, ragged in (("prompt", data.prompt), *_completions(data)):
            if ragged.values.size and ragged.values.max() >= vocab:
                pos = int(np.argmax(ragged.values >= vocab))
                row = int(np.searchsorted(ragged.offsets, pos, side="right") - 1)
                where = f"{data.report.source}: row {int(data.example_id[row])} ({part})"
                bad.setdefault(where, int(ragged.values[pos]))
    if bad:
        what, i = next(iter(bad.items()))
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        raise VocabularyError(f"{sizes}: token id {i} of {what}{more} is out of range; {fix}")
    if len(tokenizer) > vocab:
        log.warning("%s; the data's ids all fit, but ids >= %d must never appear", sizes, vocab)


def _completions(data: Tokenized):
    names = ("chosen", "rejected") if data.num_completions == 2 else ("completion",)
    return list(zip(names, data.completions))
