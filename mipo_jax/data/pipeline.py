"""The data section of a config, and `build`: source -> rows -> tokens -> batch iterator.

    cfg = data_config(source="embedded:controlled", layout="shared_prompt", row_length=128)
    it, tokenizer = build(cfg)          # resumable; this process's block of each batch
    batch = next(it)                    # host-local PreferenceBatch (numpy)
    batch = to_global(batch, sharding)  # global jax.Arrays (multi-host)

Sizes (``batch_size``, ``groups``) are per process; the global batch is ``process_count``
times larger, and the stream of global batches depends on the global batch only, not on how
many processes share it (`iterator`). The leading axis of every array (G: examples when
padded, groups when packed) is the one to shard over the data axes, so it should be a
multiple of the local devices.
"""

from __future__ import annotations

import ml_collections as mlc

from mipo_jax.data.embedded import load_tokenizer, tokenizer_for
from mipo_jax.data.encoding import Limits, tokenize_rows
from mipo_jax.data.iterator import PreferenceIterator
from mipo_jax.data.load import load_rows
from mipo_jax.data.packing import Layout


def data_config(**overrides) -> mlc.ConfigDict:
    """Defaults for the ``data`` section of an experiment config (all keys documented)."""
    c = mlc.ConfigDict()
    c.source = (
        "embedded:controlled"  # file/glob (.jsonl .json .parquet .csv), hub id, embedded:NAME
    )
    c.split = "train"  # hub split, or the embedded set's split
    c.name = mlc.FieldReference(None, field_type=str)  # hub dataset config name
    c.revision = mlc.FieldReference(None, field_type=str)  # hub revision
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


def tokenizer_name(cfg: mlc.ConfigDict) -> str:
    if cfg.tokenizer:
        return cfg.tokenizer
    if cfg.source.startswith("embedded:"):
        return tokenizer_for(cfg.source)
    raise ValueError("data.tokenizer is required for a non-embedded source")


def tokenize_split(cfg: mlc.ConfigDict, tokenizer, *, transform=None):
    """Load the rows ``cfg`` describes and tokenise all of them (on every process).

    ``transform`` (rows -> rows) runs between loading and tokenising, e.g. the trainer's
    split of paired rows into unpaired ones for KTO.
    """
    columns = dict(cfg.columns) if cfg.columns else None
    rows = load_rows(
        cfg.source, split=cfg.split, name=cfg.name, revision=cfg.revision, columns=columns
    )
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
) -> tuple[PreferenceIterator, object]:
    """(iterator, tokenizer) for the ``data`` config ``cfg``.

    The iterator yields process ``process_index``'s block of each global batch (default:
    this process of ``jax.process_count()``).
    """
    tokenizer = tokenizer or load_tokenizer(tokenizer_name(cfg))
    data = tokenize_split(cfg, tokenizer)
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
