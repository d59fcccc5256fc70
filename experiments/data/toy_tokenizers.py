"""The embedded tokenizers, built with the `tokenizers` library (each well under 1 MB).

* ``toy_words``: word level, whitespace split, BOS added by the post-processor (Llama-like);
  vocabulary = 4 special tokens + the sentiment task's 8 words and its separator ``:``.
* ``toy_chars``: one token per character (digits, ``+ - * =``, space), BOS added by the
  post-processor, decoded without separators.
* ``chat_bpe``: byte-level BPE trained on the chat set, with SmolLM2-135M-Instruct's special
  tokens (``<|im_start|>`` is BOS, ``<|im_end|>`` EOS and pad, no BOS added) and its exact
  ChatML chat template, so the chat path can be tested offline in milliseconds.
"""

from __future__ import annotations

from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from mipo_jax.data.tasks import sentiment

SPECIAL = ["<pad>", "<bos>", "<eos>", "<unk>"]
SMOL_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
SMOL_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\n" + SMOL_SYSTEM + "<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def _word_level(symbols: list[str], pre_tokenizer, decoder=None) -> Tokenizer:
    vocab = {t: i for i, t in enumerate(SPECIAL + symbols)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizer
    if decoder is not None:
        tok.decoder = decoder
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", 1)]
    )
    tok.add_special_tokens(SPECIAL)
    return tok


def _save(tok: Tokenizer, folder: Path, **special) -> None:
    from transformers import PreTrainedTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    chat_template = special.pop("chat_template", None)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, **special)
    if chat_template:
        fast.chat_template = chat_template
    fast.save_pretrained(str(folder))


def build_all(root: Path, chat_texts: list[str]) -> None:
    """Write the three tokenizers under ``root``."""
    toy = dict(bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>")
    words = _word_level([*sentiment.WORDS, sentiment.SEPARATOR], pre_tokenizers.WhitespaceSplit())
    _save(words, root / "toy_words", **toy)
    chars = _word_level(
        list("0123456789+-*= "), pre_tokenizers.Split(Regex("."), "isolated"), decoders.Fuse()
    )
    _save(chars, root / "toy_chars", **toy)
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=1024,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(chat_texts + ["system", "user", "assistant"], trainer)
    _save(
        bpe,
        root / "chat_bpe",
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
        unk_token="<|endoftext|>",
        chat_template=SMOL_TEMPLATE,
    )
