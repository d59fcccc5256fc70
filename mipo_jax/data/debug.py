"""Print decoded rows with their loss masks, the data report, and padding efficiency.

    python -m mipo_jax.data.debug --source embedded:controlled -n 2
    python -m mipo_jax.data.debug --source data.jsonl --tokenizer path/or/hub-id \\
        --max-length 512 --layout shared_prompt --row-length 2048 --efficiency

Each example is shown as its tokens, ``|``-separated, with the prompt before ``‖`` and every
token that the loss scores (completion tokens, EOS included) marked ``*``. The marks are read
back from the batch's slot view (``pred_index``/``mask``), so they show what the loss will
see, not a re-derivation.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

from mipo_jax.data.batch import num_tokens
from mipo_jax.data.encoding import Tokenized
from mipo_jax.data.iterator import PreferenceIterator
from mipo_jax.data.packing import Layout, assemble_padded


def efficiency(data: Tokenized, layout: Layout, seed: int = 0) -> dict[str, float]:
    """One epoch's non-pad token fraction and tokens per example for ``layout``."""
    it = PreferenceIterator(data, layout, seed=seed, num_epochs=1, process_index=0, process_count=1)
    used = total = examples = 0
    for b in it:
        used += num_tokens(b)
        total += b["tokens"].size
        examples += int(b["pair_valid"].sum())
    return dict(
        non_pad_fraction=used / total,
        tokens_per_example=used / examples,
        batches=it.steps_per_epoch(0),
        examples=examples,
    )


def _pieces(tokenizer, ids) -> list[str]:
    return [tokenizer.decode([int(t)]).replace("\n", "\\n") for t in ids]


def show_example(batch: dict, j: int, tokenizer, data: Tokenized, i: int) -> str:
    """Decoded prompt/completions of padded-batch group ``j`` (example ``i``) with masks."""
    sides = batch["pred_index"].shape[2]
    names = ("chosen", "rejected") if sides == 2 else ("completion",)
    length = batch["tokens"].shape[-1]
    prompt = data.prompt[i]
    out = [f"── example {i} (source row {int(batch['example_id'][j, 0])}) " + "─" * 30]
    out.append(f"prompt   ({len(prompt)} tokens): {tokenizer.decode(prompt)!r}")
    for k, name in enumerate(names):
        n = int((batch["segment_ids"][j, k] > 0).sum())
        index = batch["pred_index"][j, 0, k][batch["mask"][j, 0, k] > 0]
        scored = set((index + 1 - k * length).tolist())
        pieces = _pieces(tokenizer, batch["tokens"][j, k, :n])
        marked = [p + ("*" if t in scored else "") for t, p in enumerate(pieces)]
        comp = data.completions[k][i]
        out.append(
            f"{name:8s} ({len(comp)} tokens, {len(scored)} scored): {tokenizer.decode(comp)!r}"
        )
        p = len(prompt)
        out.append("    " + "|".join(marked[:p]) + " ‖ " + "|".join(marked[p:]))
    for key in ("ref_logps", "label"):
        if key in batch:
            out.append(f"{key}: {batch[key][j, 0].tolist()}")
    return "\n".join(out)


def show_packed_row(batch: dict, tokenizer, row: int = 0, limit: int = 64) -> str:
    """The first ``limit`` tokens of row ``row`` of group 0 with segment/attend_to/position ids."""
    seg = batch["segment_ids"][0, row]
    n = min(limit, int((seg > 0).sum()))
    attend = batch.get("attend_to", np.zeros_like(batch["segment_ids"]))[0, row]
    cols = zip(
        _pieces(tokenizer, batch["tokens"][0, row, :n]),
        seg[:n],
        attend[:n],
        batch["positions"][0, row, :n],
    )
    lines = [f"── packed group 0, row {row}: token, segment, attend_to, position"]
    lines += [f"  {p!r:>16} {s:3d} {a:3d} {q:4d}" for p, s, a, q in cols]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from mipo_jax.data.pipeline import build, data_config

    cfg = data_config()
    ap = argparse.ArgumentParser(
        prog="python -m mipo_jax.data.debug", description=__doc__.split("\n\n")[0]
    )
    ap.add_argument("--source", default=cfg.source, help="file/glob, hub id or embedded:NAME")
    ap.add_argument("--split", default="train")
    ap.add_argument("--tokenizer", default="", help="default: the embedded set's tokenizer")
    ap.add_argument("--format", default="auto", help="auto|preference|implicit_prompt|unpaired")
    ap.add_argument("--columns", default="", help="renames, e.g. prompt=question,chosen=good")
    ap.add_argument("--max-length", type=int)
    ap.add_argument("--max-prompt-length", type=int)
    ap.add_argument("--max-completion-length", type=int)
    ap.add_argument("--truncation-mode", default="keep_end", choices=["keep_end", "keep_start"])
    ap.add_argument("--bad-input", default="error", choices=["error", "skip"])
    ap.add_argument("-n", type=int, default=3, help="examples to print")
    ap.add_argument("--layout", default="padded", choices=["padded", "pairs", "shared_prompt"])
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--row-length", type=int, help="packed row length (default: 16x longest)")
    ap.add_argument("--efficiency", action="store_true", help="non-pad fraction per layout")
    a = ap.parse_args(argv)
    columns = dict(kv.split("=", 1) for kv in a.columns.split(",") if kv)
    cfg.update(
        source=a.source, split=a.split, tokenizer=a.tokenizer, format=a.format,
        truncation_mode=a.truncation_mode, bad_input=a.bad_input, max_length=a.max_length,
        max_prompt_length=a.max_prompt_length, max_completion_length=a.max_completion_length,
    )  # fmt: skip
    cfg.columns = columns
    it, tok = build(cfg, process_index=0, process_count=1)
    data = it.data
    print(data.report.summary())
    n = min(a.n, len(data))
    batch = assemble_padded(data, np.arange(n), n, int(it.need.sum(axis=1).max()), it.width)
    for j in range(n):
        print(show_example(batch, j, tok, data, j))
    longest = int(it.need.sum(axis=1).max())
    row_length = a.row_length or -(-16 * longest // 64) * 64
    if a.layout != "padded":
        lay = Layout(a.layout, rows=a.rows, row_length=row_length)
        packed = next(PreferenceIterator(data, lay, process_index=0, process_count=1))
        print(show_packed_row(packed, tok))
    if a.efficiency:
        print(
            f"── non-pad token fraction over one epoch (padded: batch_size=16, no rounding; "
            f"packed: rows={a.rows}, row_length={row_length})"
        )
        padded = dict(batch_size=16, length_multiple=1)
        layouts = {
            "padded, to the longest": Layout("padded", row_length=longest, **padded),
            "padded, longest in batch": Layout("padded", **padded),
            "padded, length-bucketed": Layout("padded", bucket_window=16, **padded),
            "pair packing": Layout("pairs", rows=a.rows, row_length=row_length),
            "shared-prompt packing": Layout("shared_prompt", rows=a.rows, row_length=row_length),
        }
        for name, lay in layouts.items():
            e = efficiency(data, lay)
            frac, per = e["non_pad_fraction"], e["tokens_per_example"]
            print(f"  {name:28s} {frac:.3f}  ({per:.1f} tokens/example)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
