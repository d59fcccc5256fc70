"""Padding efficiency of every batch layout on the embedded data (one epoch each, seed 0).

    python -m experiments.data.padding_efficiency [--no-smollm2]

Prints a markdown table: the non-pad token fraction (real tokens / row slots) and the row
slots the model processes per example (padding included), which also shows what the shared
prompt saves. Padded layouts use 16 examples per batch and no rounding of T; packed layouts
use groups of 8 rows.
"""

from __future__ import annotations

import argparse

from mipo_jax.data import Layout, load_rows, tokenize_rows
from mipo_jax.data.debug import efficiency
from mipo_jax.data.embedded import load_tokenizer

SETS = (  # (dataset, tokenizer, packed row length)
    ("controlled", "toy_words", 256),
    ("length_biased", "toy_words", 256),
    ("arithmetic", "toy_chars", 256),
    ("chat", "chat_bpe", 1024),
    ("chat", "smollm2", 1024),
)


def layouts(longest: int, row_length: int) -> dict[str, Layout]:
    padded = dict(batch_size=16, length_multiple=1)
    return {
        "padded to the longest": Layout("padded", row_length=longest, **padded),
        "padded, longest in batch": Layout("padded", **padded),
        "padded, length-bucketed": Layout("padded", bucket_window=16, **padded),
        "pair packing": Layout("pairs", rows=8, row_length=row_length),
        "shared-prompt packing": Layout("shared_prompt", rows=8, row_length=row_length),
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--no-smollm2", action="store_true", help="skip the GGUF tokenizer")
    args = ap.parse_args(argv)
    print("| data (tokenizer, packed T) | layout | non-pad fraction | row tokens / example |")
    print("|---|---|---|---|")
    for name, tok_name, row_length in SETS:
        if tok_name == "smollm2" and args.no_smollm2:
            continue
        data = tokenize_rows(load_rows(f"embedded:{name}"), load_tokenizer(tok_name))
        p, c = data.lengths()
        longest = int((p[:, None] + c).max())
        for label, lay in layouts(longest, row_length).items():
            e = efficiency(data, lay)
            slots = e["tokens_per_example"] / e["non_pad_fraction"]
            print(
                f"| {name} ({tok_name}, {row_length}) | {label} | "
                f"{e['non_pad_fraction']:.3f} | {slots:.1f} |"
            )


if __name__ == "__main__":
    main()
