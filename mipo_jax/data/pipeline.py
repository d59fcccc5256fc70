"""The data section of a config, and `build`: source -> rows -> tokens -> batch iterator.

    cfg = data_config(source="embedded:controlled", layout="shared_prompt", row_length=128)
    it, tokenizer = build(cfg)          # resumable; this process's block of each batch
    rows = split_rows(cfg, "eval")      # the evaluation rows (see `split_rows`)
    batch = next(it)                    # host-local PreferenceBatch (numpy)
    batch = to_global(batch, sharding)  # global jax.Arrays (multi-host)

Sizes (``batch_size``, ``groups``) are per process; the global batch is ``process_count``
times larger, and the stream of global batches depends on the global batch only, not on how
many processes share it (`iterator`). The leading axis of every array (G: examples when
padded, groups when packed) is the one to shard over the data axes, so it should be a
multiple of the local devices.

In-memory data (Python API): a ``datasets.Dataset``, ``DatasetDict`` or list of row dicts
cannot live in a config, so `split_rows`, `tokenize_split` and `build` take it as
``train_data=`` / ``eval_data=``, which stand in for ``source`` / ``eval_source``.
"""

from __future__ import annotations

import ml_collections as mlc
import numpy as np

from mipo_jax.data.embedded import load_tokenizer, tokenizer_for
from mipo_jax.data.encoding import Limits, tokenize_rows
from mipo_jax.data.iterator import PreferenceIterator
from mipo_jax.data.load import has_one_split, load_rows, source_name
from mipo_jax.data.packing import Layout


def data_config(**overrides) -> mlc.ConfigDict:
    """Defaults for the ``data`` section of an experiment config (all keys documented)."""
    c = mlc.ConfigDict()
    c.source = (  # file/glob (.jsonl .json .parquet .csv), save_to_disk folder, hub id,
        "embedded:controlled"  # embedded:NAME (a one-split source is used whole)
    )
    c.split = "train"  # the training split of a source with splits (hub, DatasetDict, embedded)
    c.name = mlc.FieldReference(None, field_type=str)  # hub dataset config name
    c.revision = mlc.FieldReference(None, field_type=str)  # hub revision (branch, tag, commit)
    c.eval_source = ""  # evaluation rows from another source ("" = data.source)
    c.eval_split = "test"  # their split (must exist in a source with splits)
    c.eval_fraction = 0.0  # > 0: hold out this fraction of the training rows for evaluation
    c.columns = mlc.ConfigDict()  # rename: {ours: theirs}, e.g. {"prompt": "question"}
    c.format = "auto"  # auto | preference | implicit_prompt | unpaired
    c.tokenizer = ""  # embedded name, "smollm2", local folder or hub id; "" = the set's own
    c.add_bos = "auto"  # auto | True | False (standard rows; chat rows follow the template)
    c.eos_token = mlc.FieldReference(None, field_type=str)  # default: the tokenizer's EOS
    c.max_length = mlc.FieldReference(None, field_type=int)  # prompt + completion, tokens
    c.max_prompt_length = mlc.FieldReference(None, field_type=int)
    c.max_completion_length = mlc.FieldReference(None, field_type=int)
    c.truncation_mode = "keep_end"  # keep_end (drop prompt start first) | keep_start
    c.bad_input = "error"  # error | skip
    c.layout = "padded"  # padded | pairs | shared_prompt
    c.batch_size = 8  # padded: examples per batch and process
    c.rows = 8  # packed: rows per group
    c.groups = 1  # packed: groups (independently packed blocks of rows) per batch and process
    c.row_length = mlc.FieldReference(None, field_type=int)  # packed: L; padded: fixed T
    c.max_pairs = mlc.FieldReference(None, field_type=int)  # packed: example slots per batch
    c.length_multiple = 8  # padded: T rounded up to a multiple of this
    c.bucket_window = 0  # padded: batches per length-sorting window (0 = no bucketing)
    c.lookahead = mlc.FieldReference(None, field_type=int)  # packed: examples per planning window
    c.completion_width = mlc.FieldReference(None, field_type=int)  # C of the pair view
    c.seed = 0
    c.num_epochs = mlc.FieldReference(None, field_type=int)  # None = forever
    c.drop_remainder = True
    c.update(overrides)
    return c


def layout_of(cfg: mlc.ConfigDict) -> Layout:
    return Layout(
        kind=cfg.layout,
        batch_size=cfg.batch_size,
        rows=cfg.rows,
        groups=cfg.groups,
        row_length=cfg.row_length,
        max_pairs=cfg.max_pairs,
        length_multiple=cfg.length_multiple,
        bucket_window=cfg.bucket_window,
        lookahead=cfg.lookahead,
        completion_width=cfg.completion_width,
    )


def limits_of(cfg: mlc.ConfigDict) -> Limits:
    return Limits(
        max_length=cfg.max_length,
        max_prompt_length=cfg.max_prompt_length,
        max_completion_length=cfg.max_completion_length,
        truncation_mode=cfg.truncation_mode,
    )


def tokenizer_name(cfg: mlc.ConfigDict, *, train_data=None) -> str:
    """``data.tokenizer``, or the embedded source's own (not for in-memory ``train_data``)."""
    if cfg.tokenizer:
        return cfg.tokenizer
    if train_data is None and cfg.source.startswith("embedded:"):
        return tokenizer_for(cfg.source)
    what = "in-memory data" if train_data is not None else "a non-embedded source"
    raise ValueError(f"data.tokenizer is required for {what}")


ROLES = ("train", "eval")
HOLDOUT_SEED = 0  # eval_fraction's rows do not depend on data.seed


def holdout_mask(n: int, fraction: float) -> np.ndarray:
    """[n] bool, True for the ``round(fraction * n)`` (1 .. n-1) held-out rows: fixed rows,
    a function of ``n`` and ``fraction`` only."""
    if n < 2:
        raise ValueError(f"data.eval_fraction needs at least 2 rows, the source has {n}")
    k = min(max(round(fraction * n), 1), n - 1)
    mask = np.zeros(n, bool)
    mask[np.random.default_rng(HOLDOUT_SEED).permutation(n)[:k]] = True
    return mask


def eval_plan(cfg: mlc.ConfigDict, role="eval", *, train_data=None, eval_data=None) -> tuple:
    """(train source, eval source or None, eval_fraction, eval split), checked without loading.

    Raises the errors `split_rows` would raise for ``role`` (a trainer can call it before
    anything starts): eval_fraction out of [0, 1), both an eval source and a fraction, or
    (eval role) evaluation on a one-split source that has no evaluation split.
    """
    fraction = float(cfg.get("eval_fraction", 0.0) or 0.0)
    train = cfg.source if train_data is None else train_data
    other = eval_data if eval_data is not None else (cfg.get("eval_source") or None)
    eval_split = cfg.get("eval_split", "test")
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"data.eval_fraction must be in [0, 1), got {fraction}")
    if fraction and other is not None:
        raise ValueError(
            "set data.eval_fraction or an evaluation source (data.eval_source, eval_data), not both"
        )
    no_split = not fraction and other is None and eval_split != cfg.split
    if role == "eval" and no_split and has_one_split(train):
        raise ValueError(
            f"{source_name(train)} is one split (its rows are the training rows), so it has no "
            f"evaluation split {eval_split!r}: set data.eval_source (or eval_data), "
            f"data.eval_fraction (held-out training rows), or data.eval_split={cfg.split!r} "
            "to evaluate on the training rows"
        )
    return train, other, fraction, eval_split


def split_rows(cfg: mlc.ConfigDict, role: str = "train", *, train_data=None, eval_data=None):
    """The raw rows (`load.Rows`) that ``role`` ("train" or "eval") uses, as ``cfg`` says.

    * train: ``source`` (or ``train_data``) at ``split``, minus the held-out rows when
      ``eval_fraction`` > 0;
    * eval: with ``eval_fraction`` > 0, those held-out rows (disjoint from the training
      rows, the same ones in every run of the same source); else ``eval_source`` (or
      ``eval_data``) at ``eval_split`` (a one-split source is used whole); else the
      training source's split ``eval_split``, which must exist (a one-split source has
      only its rows: evaluating on them needs ``eval_split == split``). See `eval_plan`.

    Row numbers in messages and ``example_id`` are always the source's own.
    """
    if role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}, got {role!r}")
    train, other, fraction, eval_split = eval_plan(
        cfg, role, train_data=train_data, eval_data=eval_data
    )
    load = lambda source, split: load_rows(  # noqa: E731
        source, split=split, name=cfg.name, revision=cfg.revision,
        columns=dict(cfg.columns) if cfg.columns else None,
    )  # fmt: skip
    if fraction:
        rows = load(train, cfg.split)
        mask = holdout_mask(len(rows), fraction)
        return rows.subset(np.flatnonzero(mask if role == "eval" else ~mask))
    if role == "train":
        return load(train, cfg.split)
    return load(other if other is not None else train, eval_split)


def tokenize_split(
    cfg: mlc.ConfigDict,
    tokenizer,
    *,
    transform=None,
    role: str = "train",
    train_data=None,
    eval_data=None,
):
    """Load the rows ``role`` uses (`split_rows`) and tokenise all of them (on every process).

    ``transform`` (rows -> rows) runs between loading and tokenising, e.g. the trainer's
    split of paired rows into unpaired ones for KTO.
    """
    rows = split_rows(cfg, role, train_data=train_data, eval_data=eval_data)
    if transform is not None:
        rows = transform(rows)
    add_bos = cfg.add_bos if cfg.add_bos == "auto" else str(cfg.add_bos).lower() == "true"
    return tokenize_rows(
        rows,
        tokenizer,
        kind=cfg.format,
        limits=limits_of(cfg),
        bad_input=cfg.bad_input,
        add_bos=add_bos,
        eos_token=cfg.eos_token,
    )


def build(
    cfg: mlc.ConfigDict,
    *,
    tokenizer=None,
    process_index: int | None = None,
    process_count: int | None = None,
    role: str = "train",
    train_data=None,
    eval_data=None,
) -> tuple[PreferenceIterator, object]:
    """(iterator, tokenizer) for the ``data`` config ``cfg`` and ``role`` (`split_rows`).

    The iterator yields process ``process_index``'s block of each global batch (default:
    this process of ``jax.process_count()``).
    """
    tokenizer = tokenizer or load_tokenizer(tokenizer_name(cfg, train_data=train_data))
    data = tokenize_split(cfg, tokenizer, role=role, train_data=train_data, eval_data=eval_data)
    it = PreferenceIterator(
        data,
        layout_of(cfg),
        seed=cfg.seed,
        num_epochs=cfg.num_epochs,
        drop_remainder=cfg.drop_remainder,
        process_index=process_index,
        process_count=process_count,
    )
    return it, tokenizer
