"""Rows from local files, ``save_to_disk`` folders, the Hugging Face hub, embedded sets or memory.

`load_rows` returns a `Rows` table whose entries are raw row dicts, or `BadRow`s for lines
that could not even be parsed. Files go through 🤗 ``datasets`` (memory-mapped Arrow);
when ``datasets`` refuses a JSON/JSONL/CSV file (bytes that are not UTF-8, a malformed
line, a column whose type changes between rows), a tolerant line reader takes over so that
the bad-input policy can name the exact row instead of failing on the whole file.

Sources (`source_kind`):

=============== =============================================================== ===========
kind            source                                                          splits
=============== =============================================================== ===========
``files``       ``path/to/file.jsonl`` (``.json``, ``.parquet``, ``.csv``) or   one
                a glob of such files
``disk``        a folder written by ``Dataset.save_to_disk``                    one
``disk_dict``   a folder written by ``DatasetDict.save_to_disk``                its splits
``folder``      any other folder of data files, laid out as a hub dataset repo  its splits
                (split from file names: ``train*.parquet``, ``data/test-*``...)
``embedded``    ``embedded:NAME`` (`mipo_jax.data.embedded.EMBEDDED`)           train, test
``hub``         anything else: a hub dataset id (``name``, ``revision``)        its splits
``memory``      a ``datasets.Dataset`` or a list of row dicts (Python API)      one
``memory_dict`` a ``datasets.DatasetDict`` (Python API)                         its splits
=============== =============================================================== ===========

A one-split source is used whole whatever ``split`` says; a source with splits must have
``split``, else `SplitNotFoundError` lists the splits it has. A source with no rows raises
`BadInputError` (reason ``empty_source``). Hub ids load with ``datasets.load_dataset``;
offline (``HF_HUB_OFFLINE=1`` or no connection), a snapshot in the hub cache (``hf download
--repo-type dataset ID``) is read first at exactly ``revision``, then ``datasets``' own cache.
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

import numpy as np

from mipo_jax.data.report import BadInputError, BadRow

BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}
ONE_SPLIT = ("files", "disk", "memory")


class SplitNotFoundError(ValueError):
    """A split that the source does not have (the message lists those it has)."""

    def __init__(self, source: str, split: str, splits: Sequence[str]):
        self.source, self.split, self.splits = source, split, list(splits)
        super().__init__(f"{source}: no split {split!r}; its splits are {list(splits)}")


@dataclasses.dataclass
class Rows:
    """A table of raw rows: a ``datasets.Dataset`` or a list (from the tolerant reader).

    ``index`` (when set) holds each entry's row number in the source, so that a subset
    (`subset`) still reports, and keeps as ``example_id``, the source's row numbers.
    """

    source: str
    table: Any  # datasets.Dataset | list[dict | BadRow]
    column_names: list[str]
    index: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.table)

    def iter(self, lo: int, hi: int, chunk: int = 1024) -> Iterator[tuple[int, Any]]:
        """(source row number, row dict or BadRow) for entries ``lo <= i < hi``."""
        rows = self._iter(lo, hi, chunk)
        if self.index is None:
            yield from rows
        else:
            yield from ((int(self.index[i]), row) for i, row in rows)

    def _iter(self, lo: int, hi: int, chunk: int) -> Iterator[tuple[int, Any]]:
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

    def subset(self, positions: np.ndarray, source: str | None = None) -> Rows:
        """The entries at ``positions`` (ascending), keeping their source row numbers."""
        positions = np.asarray(positions, np.int64)
        if isinstance(self.table, list):
            table = [self.table[i] for i in positions]
        else:
            table = self.table.select(positions)
        index = positions if self.index is None else self.index[positions]
        return Rows(source or self.source, table, list(self.column_names), index)

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
        return Rows(self.source, table, names, self.index)


def _is_path(source: Any) -> bool:
    return isinstance(source, str | os.PathLike)


def _is_dataset(source: Any) -> bool:
    import datasets

    return isinstance(source, datasets.Dataset)


def source_kind(source: Any) -> str:
    """Which kind of source ``source`` is (table in the module docstring)."""
    if not _is_path(source):
        import datasets

        if isinstance(source, datasets.DatasetDict):
            return "memory_dict"
        if isinstance(source, datasets.Dataset) or (
            isinstance(source, Sequence) and not isinstance(source, str | bytes)
        ):
            return "memory"
        raise TypeError(
            f"a data source is a path, a hub id, a datasets.Dataset/DatasetDict or a list of "
            f"row dicts, not {type(source).__name__}"
        )
    source = os.fspath(source)
    if source.startswith("embedded:"):
        return "embedded"
    if os.path.isdir(source):
        if os.path.isfile(os.path.join(source, "dataset_dict.json")):
            return "disk_dict"
        if os.path.isfile(os.path.join(source, "state.json")):
            return "disk"
        return "folder"
    return "files" if resolve_files(source) is not None else "hub"


def has_one_split(source: Any) -> bool:
    """Whether ``source`` is one split (a file, a saved ``Dataset``, an in-memory table)."""
    return source_kind(source) in ONE_SPLIT


def source_name(source: Any) -> str:
    """How messages name ``source``."""
    if _is_path(source):
        return os.fspath(source)
    return f"<in-memory {type(source).__name__}>"


def resolve_files(source: str) -> list[str] | None:
    """Local files named by ``source`` (a path or a glob), else None (a hub id)."""
    files = sorted(glob.glob(source)) if any(c in source for c in "*?[") else [source]
    if not all(os.path.isfile(f) for f in files) or not files:
        if (
            os.path.exists(source)
            or source.startswith((".", "/", "~"))
            or source.endswith(tuple(BUILDERS))
        ):
            raise FileNotFoundError(f"{source}: no such data file")
        return None  # a hub id
    exts = {os.path.splitext(f)[1].lower() for f in files}
    if len(exts) != 1 or exts.pop() not in BUILDERS:
        raise ValueError(f"{source}: files must all be one of {sorted(BUILDERS)}")
    return files


def load_rows(
    source: Any,
    *,
    split: str = "train",
    name: str | None = None,
    revision: str | None = None,
    columns: Mapping[str, str] | None = None,
) -> Rows:
    """The raw rows of ``source`` (see module docstring), columns renamed by ``columns``."""
    kind = source_kind(source)
    if kind == "embedded":
        from mipo_jax.data.embedded import embedded_path

        path = embedded_path(os.fspath(source).removeprefix("embedded:"), split)
        rows = _load_files([path], path)
    elif kind == "files":
        files = resolve_files(os.fspath(source))
        label = files[0] if len(files) == 1 else f"{source} ({len(files)} files)"
        rows = _load_files(files, label)
    elif kind == "memory" and not _is_dataset(source):
        records = list(source)
        rows = Rows(source_name(source), records, _column_names(records))
    else:
        label = source_name(source)
        if kind not in ONE_SPLIT:
            label = f"{label} (split {split!r})"
        ds = _load_dataset(kind, source, split, name, revision)
        rows = Rows(label, ds, list(ds.column_names))
    if len(rows) == 0:
        what = "the file is empty" if kind in ("files", "embedded") else "it is empty"
        raise BadInputError(rows.source, None, "empty_source", f"{what}: no rows")
    return rows.rename(columns)


def _load_dataset(kind: str, source: Any, split: str, name, revision):
    """A ``datasets.Dataset`` for the non-file kinds."""
    import datasets

    label = source_name(source)
    if kind == "memory":
        return source
    if kind == "memory_dict":
        if split not in source:
            raise SplitNotFoundError(label, split, list(source))
        return source[split]
    if kind == "disk":
        return datasets.Dataset.load_from_disk(os.fspath(source))
    if kind == "disk_dict":
        with open(os.path.join(source, "dataset_dict.json")) as f:
            splits = json.load(f)["splits"]
        if split not in splits:
            raise SplitNotFoundError(label, split, splits)
        return datasets.Dataset.load_from_disk(os.path.join(source, split))
    if kind == "folder":
        return _with_split_check(label, split, datasets.load_dataset, os.fspath(source), name)
    return _load_hub(os.fspath(source), split, name, revision)


def _with_split_check(label: str, split: str, load, *args, **kwargs):
    """``load(*args, split=split)``, a missing split raised as `SplitNotFoundError`."""
    try:
        return load(*args, split=split, **kwargs)
    except ValueError as e:  # datasets: 'Unknown split "x". Should be one of [...]'
        text = str(e)
        if not text.startswith("Unknown split"):
            raise
        splits = text.partition("Should be one of ")[2].rstrip(".")
        raise SplitNotFoundError(label, split, _parse_list(splits)) from None


def _parse_list(text: str) -> list[str]:
    import ast

    try:
        return [str(s) for s in ast.literal_eval(text)]
    except (ValueError, SyntaxError):
        return [text]


def _load_hub(repo_id: str, split: str, name, revision):
    """A hub dataset: ``datasets.load_dataset`` online; offline, the hub cache's snapshot first."""
    import datasets
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    def from_datasets():
        return _with_split_check(
            repo_id, split, datasets.load_dataset, repo_id, name, revision=revision
        )

    offline = constants.is_offline_mode() or datasets.config.HF_HUB_OFFLINE
    if not offline:
        try:
            return from_datasets()
        except ConnectionError:
            pass  # no network: try the local caches below
    try:
        folder = snapshot_download(
            repo_id, repo_type="dataset", revision=revision, local_files_only=True
        )
    except LocalEntryNotFoundError:
        folder = None
    if folder is not None:
        return _with_split_check(repo_id, split, datasets.load_dataset, folder, name)
    try:
        return from_datasets()  # datasets' own cache of an earlier online load
    except ConnectionError as e:
        raise FileNotFoundError(
            f"{repo_id}: not a local file or folder, and the hub dataset (revision "
            f"{revision or 'main'}) is neither reachable (offline) nor cached; download it "
            f"with network (`hf download --repo-type dataset {repo_id}`) or give a local path"
        ) from e


def _load_files(files: Sequence[str], label: str) -> Rows:
    """Rows of local JSON/JSONL/parquet/CSV files (one extension)."""
    if all(_blank(f) for f in files):
        raise BadInputError(label, None, "empty_source", "the file is empty: no rows")
    builder = BUILDERS[os.path.splitext(files[0])[1].lower()]
    try:
        import datasets

        ds = datasets.load_dataset(builder, data_files=list(files), split="train")
        return Rows(label, ds, list(ds.column_names))
    except Exception:
        if builder == "parquet":
            raise
        rows = Rows(label, _tolerant_read(files, builder), [])
        rows.column_names = _column_names(rows.table)
        return rows


def _blank(path: str) -> bool:
    """An empty file, a parquet file of no rows, or a text file of whitespace only."""
    size = os.path.getsize(path)
    if size == 0:
        return True
    if path.lower().endswith(".parquet"):
        import pyarrow.parquet as pq

        try:
            return pq.ParquetFile(path).metadata.num_rows == 0
        except Exception:  # not parquet: datasets says so
            return False
    if size > 4096:
        return False
    with open(path, "rb") as f:
        return not f.read().strip()


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
