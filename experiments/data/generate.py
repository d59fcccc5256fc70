"""Regenerate the embedded tokenizers and datasets (deterministic; about 10 s on 2 cores).

    python -m experiments.data.generate            # rewrite mipo_jax/data/assets
    python -m experiments.data.generate --check    # exit 1 if anything would change

Each dataset's datasheet (``assets/datasets/<name>/README.md``) is hand-written prose with a
statistics block between ``<!-- stats -->`` and ``<!-- /stats -->`` that this script fills.
"""

from __future__ import annotations

import argparse
import filecmp
import json
import shutil
import sys
import tempfile
from pathlib import Path

from experiments.data import stats, toy_tokenizers
from mipo_jax.data.embedded import ASSETS
from mipo_jax.data.tasks import arithmetic, chat, sentiment

SIZES = {"train": 4096, "test": 512}
SEEDS = {"train": 0, "test": 1}


def datasets() -> dict[str, dict[str, list[dict]]]:
    """name -> split -> rows, all deterministic."""
    out = {}
    for task in sentiment.TASKS:
        out[task] = {s: sentiment.generate(task, SIZES[s], SEEDS[s]) for s in SIZES}
    out["arithmetic"] = {s: arithmetic.generate(s, 2 * SIZES[s], SEEDS[s]) for s in SIZES}
    out["chat"] = {s: chat.generate(SIZES[s] // 4, 10 + SEEDS[s]) for s in SIZES}
    return out


def write_jsonl(path: Path, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def fill_stats(datasheet: Path, block: str) -> None:
    text = datasheet.read_text() if datasheet.exists() else "<!-- stats -->\n<!-- /stats -->\n"
    head, _, rest = text.partition("<!-- stats -->")
    _, _, tail = rest.partition("<!-- /stats -->")
    datasheet.write_text(f"{head}<!-- stats -->\n{block.strip()}\n<!-- /stats -->{tail}")


def generate(root: Path) -> None:
    """Write tokenizers and datasets (with datasheet statistics) under ``root``."""
    toy_tokenizers.build_all(root / "tokenizers", chat_texts=chat_corpus())
    for name, splits in datasets().items():
        folder = root / "datasets" / name
        folder.mkdir(parents=True, exist_ok=True)
        for split, rows in splits.items():
            write_jsonl(folder / f"{split}.jsonl", rows)
        fill_stats(folder / "README.md", stats.block(name, splits))


def chat_corpus() -> list[str]:
    """Texts the chat BPE is trained on: every message of the chat set, both splits."""
    rows = [r for s in SIZES for r in chat.generate(SIZES[s] // 4, 10 + SEEDS[s])]
    texts = [m["content"] for r in rows for key in ("prompt", "chosen", "rejected") for m in r[key]]
    return texts + [m for m in (chat.ONE_SENTENCE, *chat.SYSTEMS, toy_tokenizers.SMOL_SYSTEM)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare instead of writing")
    args = parser.parse_args(argv)
    if not args.check:
        generate(ASSETS)
        print(f"wrote {ASSETS}")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        shutil.copytree(ASSETS, tmp, dirs_exist_ok=True)  # keeps the hand-written prose
        generate(Path(tmp))
        diff = _diff(filecmp.dircmp(ASSETS, tmp))
    for d in diff:
        print(f"differs: {d}")
    return 1 if diff else 0


def _diff(cmp: filecmp.dircmp, prefix: str = "") -> list[str]:
    _, mismatch, errors = filecmp.cmpfiles(cmp.left, cmp.right, cmp.common_files, shallow=False)
    out = [prefix + f for f in mismatch + errors + cmp.left_only + cmp.right_only]
    for name, sub in cmp.subdirs.items():
        out += _diff(sub, f"{prefix}{name}/")
    return out


if __name__ == "__main__":
    sys.exit(main())
