"""Rows from local files (json, jsonl, parquet, csv), a Hugging Face hub id or an embedded set.

`load_rows` returns a `Rows` table whose entries are raw row dicts, or `BadRow`s for lines
that could not even be parsed. Files go through 🤗 ``datasets`` (memory-mapped Arrow);
when ``datasets`` refuses a JSON/JSONL/CSV file (bytes that are not UTF-8, a malformed
line, a column whose type changes between rows), a tolerant line reader takes over so that
the bad-input policy can name the exact row instead of failing on the whole file.

Sources:
  * ``path/to/file.jsonl`` (or ``.json``, ``.parquet``, ``.csv``) or a glob of such files;
  * ``embedded:NAME`` — one of `mipo_jax.data.embedded.EMBEDDED` (``split`` picks the file);
  * anything else is a hub id, loaded with ``datasets.load_dataset(id, name, split=...)``.
"""

from __future__ import annotations

import csv
import dataclasses
import glob
import io
import json
import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from mipo_jax.data.report import BadRow

BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}


@dataclasses.dataclass
class Rows:
    """A table of raw rows: a ``datasets.Dataset`` or a list (from the tolerant reader)."""

    source: str
    table: Any  # datasets.Dataset | list[dict | BadRow]
    column_names: list[str]

    def __len__(self) -> int:
        return len(self.table)

    def iter(self, lo: int, hi: int, chunk: int = 1024) -> Iterator[tuple[int, Any]]:
        """(row index, row dict or BadRow) for rows ``lo <= i < hi``."""
        if isinstance(self.table, list):
            yield from zip(range(lo, hi), self.table[lo:hi])
            return
        for start in range(lo, hi, chunk):
            stop = min(hi, start + chunk)
            try:
                cols = self.table[start:stop]
            except UnicodeDecodeError:  # Arrow keeps invalid UTF-8 until it is read: find it
                yield from self._rows_one_by_one(start, stop)
                continue
            names = list(cols)
            for j, values in enumerate(zip(*(cols[c] for c in names))):
                yield start + j, dict(zip(names, values))

    def _rows_one_by_one(self, lo: int, hi: int) -> Iterator[tuple[int, Any]]:
        for i in range(lo, hi):
            try:
                yield i, self.table[i]
            except UnicodeDecodeError as e:
                yield i, BadRow("undecodable", f"a field is not valid UTF-8 ({e.reason})")

    def rename(self, columns: Mapping[str, str] | None) -> Rows:
        """Rename columns ``{ours: theirs}``, e.g. ``{"prompt": "question"}``."""
        if not columns:
            return self
        inverse = {theirs: ours for ours, theirs in columns.items()}
        missing = [t for t in inverse if t not in self.column_names]
        if missing:
            raise ValueError(f"{self.source}: columns {missing} (from 'columns') do not exist")
        names = [inverse.get(c, c) for c in self.column_names]
        if isinstance(self.table, list):
            table = [
                r if isinstance(r, BadRow) else {inverse.get(k, k): v for k, v in r.items()}
                for r in self.table
            ]
        else:
            table = self.table.rename_columns(inverse)
        return Rows(self.source, table, names)


def resolve_files(source: str, split: str) -> list[str] | None:
    """Local files named by ``source`` (a path, a glob or ``embedded:NAME``), else None."""
    if source.startswith("embedded:"):
        from mipo_jax.data.embedded import embedded_path

        return [embedded_path(source.removeprefix("embedded:"), split)]
    files = sorted(glob.glob(source)) if any(c in source for c in "*?[") else [source]
    if not all(os.path.isfile(f) for f in files) or not files:
        if os.path.exists(source) or source.startswith((".", "/")):
            raise FileNotFoundError(f"{source}: no such data file")
        return None  # a hub id
    exts = {os.path.splitext(f)[1].lower() for f in files}
    if len(exts) != 1 or exts.pop() not in BUILDERS:
        raise ValueError(f"{source}: files must all be one of {sorted(BUILDERS)}")
    return files


def load_rows(
    source: str,
    *,
    split: str = "train",
    name: str | None = None,
    revision: str | None = None,
    columns: Mapping[str, str] | None = None,
) -> Rows:
    """The raw rows of ``source`` (see module docstring), columns renamed by ``columns``."""
    files = resolve_files(source, split)
    if files is None:
        import datasets

        ds = datasets.load_dataset(source, name, split=split, revision=revision)
        return Rows(source, ds, list(ds.column_names)).rename(columns)
    label = files[0] if len(files) == 1 else f"{source} ({len(files)} files)"
    builder = BUILDERS[os.path.splitext(files[0])[1].lower()]
    try:
        import datasets

        ds = datasets.load_dataset(builder, data_files=files, split="train")
        rows = Rows(label, ds, list(ds.column_names))
    except Exception:
        if builder == "parquet":
            raise
        rows = Rows(label, _tolerant_read(files, builder), [])
        rows.column_names = _column_names(rows.table)
    return rows.rename(columns)


def _column_names(table: Sequence[Any]) -> list[str]:
    names: dict[str, None] = {}
    for r in table:
        if isinstance(r, dict):
            names.update(dict.fromkeys(r))
    return list(names)


def _tolerant_read(files: Sequence[str], builder: str) -> list[dict | BadRow]:
    """Rows of JSON/JSONL/CSV files, one `BadRow` per line that does not parse.

    Bytes are decoded with ``surrogateescape`` so that a non-UTF-8 byte becomes a lone
    surrogate, which `formats.text` then reports as ``undecodable`` for that row only.
    """
    out: list[dict | BadRow] = []
    for path in files:
        with open(path, "rb") as f:
            data = f.read().decode("utf-8", errors="surrogateescape")
        if builder == "csv":
            for line, row in enumerate(csv.DictReader(io.StringIO(data, newline=""))):
                out.append(dict(row) if None not in row else BadRow("malformed", f"CSV row {line}"))
            continue
        if data.lstrip().startswith("["):  # a JSON array of records
            try:
                records = json.loads(data)
            except json.JSONDecodeError as e:
                out.append(BadRow("malformed", f"invalid JSON: {e}"))
                continue
            out.extend(
                r if isinstance(r, dict) else BadRow("malformed", "not an object") for r in records
            )
            continue
        for line, text in enumerate(data.splitlines()):
            if not text.strip():
                continue
            try:
                record = json.loads(text)
            except json.JSONDecodeError as e:
                out.append(BadRow("malformed", f"line {line + 1} is not valid JSON: {e.msg}"))
                continue
            if not isinstance(record, dict):
                out.append(BadRow("malformed", f"line {line + 1} is not a JSON object"))
            else:
                out.append(record)
    return out
