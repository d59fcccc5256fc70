"""Step batches from the data pipeline: G groups per step, global arrays, resumable state.

Thin adapter over `mipo_jax.data` (which yields host-local batches in the step's group
layout). It adds what a training run needs on top:

* the global batch size: ``config.batch_size`` pairs per step for the padded layout (each
  process yields its ``batch_size / process_count`` examples of the global batch); for
  packed layouts ``config.data.groups`` packed groups per step and process. The global batches
  depend on the global batch only, so runs with 1 or N processes train on the same data;
* KTO on a paired set: each pair becomes a desirable (chosen) and an undesirable (rejected)
  row, as TRL's ``unpair_preference_dataset`` does; SFT (``objective='sft'``) on a paired
  set trains on the chosen responses;
* which reference log-probs reach the step: the dataset's own columns only with
  ``reference.mode = "dataset"``, the on-disk cache with ``"cached"``;
* a global iterator state (the same on every process) for checkpoints; it resumes in a run
  with another process count and the same global batch, and refuses other data or batches.
"""

import copy
import dataclasses
import functools

import jax
import ml_collections as mlc
import numpy as np

from mipo_jax.data import to_global
from mipo_jax.data.embedded import load_tokenizer
from mipo_jax.data.iterator import PreferenceIterator
from mipo_jax.data.load import Rows
from mipo_jax.data.pipeline import layout_of, tokenize_split, tokenizer_name
from mipo_jax.models.masks import attention_span

HOST_ONLY = ("example_id",)


def unpair(rows: Rows) -> Rows:
    """Paired rows -> unpaired rows (chosen: label True, rejected: label False)."""
    out = []
    for _, row in rows.iter(0, len(rows)):
        if not isinstance(row, dict):
            out.append(row)
            continue
        prompt = row.get("prompt", "")
        for key, label in (("chosen", True), ("rejected", False)):
            out.append({"prompt": prompt, "completion": row.get(key), "label": label})
    return Rows(rows.source + " (unpaired)", out, ["prompt", "completion", "label"])


def data_section(config) -> mlc.ConfigDict:
    """The ``data`` section with this process's batch size filled in."""
    d = copy.deepcopy(config.data)
    with d.unlocked():
        n = jax.process_count()
        if d.layout == "padded" and config.batch_size % n:
            raise ValueError(f"batch_size={config.batch_size} does not split over {n} processes")
        d.batch_size = config.batch_size // n  # padded: this process's share of each batch
        if d.format == "auto" and config.objective == "unpaired":
            d.format = "unpaired"
    return d


def check_objective(rows: Rows, objective: str, fmt: str) -> None:
    """Refuse data whose format the objective cannot train on, saying which config fits."""
    cols = set(rows.column_names)
    unpaired = fmt == "unpaired" or ({"completion", "label"} <= cols and "chosen" not in cols)
    if objective == "paired" and unpaired:
        raise ValueError(
            f"{rows.source} holds unpaired rows (prompt/completion/label, KTO's format) but "
            "this config trains on preference pairs: use configs/kto.py (objective "
            "'unpaired'), or give prompt/chosen/rejected rows"
        )


def tokenize(d: mlc.ConfigDict, tokenizer, *, objective: str, role: str, train_data, eval_data):
    """The tokenised rows of ``role`` (train or eval: `mipo_jax.data.pipeline.split_rows`),
    all of them (every process holds every row); ``train_data``/``eval_data``: in-memory
    data standing in for ``data.source``/``data.eval_source``."""

    def transform(loaded: Rows) -> Rows:
        check_objective(loaded, objective, d.format)
        if objective == "unpaired" and "completion" not in loaded.column_names:
            return unpair(loaded)
        return loaded

    data = tokenize_split(d, tokenizer, transform=transform, role=role, train_data=train_data,
                          eval_data=eval_data)  # fmt: skip
    if objective == "sft" and data.num_completions > 1:  # the chosen responses
        data = dataclasses.replace(data, completions=data.completions[:1], ref_logps=None,
                                   label=None)  # fmt: skip
    return data


def tokenizer_spec(config, train_data=None) -> tuple[str, str | None]:
    """(tokenizer, revision): ``data.tokenizer``; when it is empty and the model is a
    pretrained one (``hf:``, ``smollm2``), the model's own; else the embedded set's."""
    d, init = config.data, config.model.init
    if not d.tokenizer and init.startswith("hf:"):
        return init, config.model.get("revision")
    if not d.tokenizer and init == "smollm2":
        return "smollm2", None
    return tokenizer_name(d, train_data=train_data), None


class StepData:
    """Iterator of step batches (host-local numpy; `to_device` makes them global)."""

    def __init__(
        self,
        config,
        role: str,
        *,
        tokenizer=None,
        num_epochs=None,
        seed=None,
        train_data=None,
        eval_data=None,
    ):
        """``role``: ``train`` or ``eval`` (which rows: `mipo_jax.data.pipeline.split_rows`);
        ``train_data``/``eval_data``: in-memory data (a ``datasets.Dataset``, ``DatasetDict``
        or list of row dicts) standing in for ``data.source``/``data.eval_source``."""
        self.config = config
        d = data_section(config)
        with d.unlocked():
            if num_epochs is not None:
                d.num_epochs = num_epochs
            if seed is not None:
                d.seed = seed
        self.section = d
        if tokenizer is None:
            spec, revision = tokenizer_spec(config, train_data)
            tokenizer = load_tokenizer(spec, revision=revision)
        self.tokenizer = tokenizer
        self.data = tokenize(d, tokenizer, objective=config.objective, role=role,
                             train_data=train_data, eval_data=eval_data)  # fmt: skip
        self.iterator = PreferenceIterator(
            self.data, layout_of(d), seed=d.seed, num_epochs=d.num_epochs,
            drop_remainder=d.drop_remainder,
        )  # fmt: skip
        self.keep_dataset_ref = config.reference.mode == "dataset"
        self.cache = None  # a ReferenceCache, attached by the loop in "cached" mode

    @property
    def width(self) -> int:
        return self.iterator.width

    @functools.cached_property
    def attention_span(self) -> int | None:
        """Packed layouts: the longest unit packed in a row, which bounds how far back any
        token attends (the step's blocked attention skips keys further back); None when
        padded (one sequence per row: the row length is the bound)."""
        layout = self.iterator.layout
        if not layout.packed:
            return None
        return int(self.iterator.units.max())  # the iterator's unit lengths, per layout

    @property
    def max_length(self) -> int:
        p, c = self.data.lengths()
        return int((p + c.max(axis=1)).max())

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        batch = next(self.iterator)  # already holds data.groups groups (packed layouts)
        bound = self.attention_span
        if bound is not None:  # a promise the step relies on; costs a pass over the ids
            reach = attention_span(batch["segment_ids"], batch.get("attend_to"))
            if reach > bound:
                raise RuntimeError(
                    f"a packed batch attends {reach} tokens back, more than its longest unit "
                    f"({bound}); examples {sorted(set(batch['example_id'].ravel().tolist()))}"
                )
        if self.cache is not None:
            batch = self.cache.attach(batch)
        elif not self.keep_dataset_ref:
            batch.pop("ref_logps", None)
        if "label" in batch:
            batch["label"] = np.asarray(batch["label"], np.float32)
        return batch

    def next(self, step: int, state) -> dict:
        """The loop's batch-source interface (the step and train state are not needed)."""
        return next(self)

    def get_state(self) -> dict:
        """Global position and fingerprint (equal on every process, for any process count)."""
        return self.iterator.get_state()

    def set_state(self, state: dict) -> None:
        self.iterator.set_state(state)


def to_device(batch: dict, sharding, *, whole: bool = False) -> dict:
    """Global arrays sharded on the group axis; host-only fields are dropped.

    ``batch`` is this process's block of the global batch (what `StepData` yields), or with
    ``whole=True`` the whole global batch, the same on every process (reference scoring,
    exact task evaluation). In one process the two are the same thing.
    """
    batch = {k: v for k, v in batch.items() if k not in HOST_ONLY}
    if jax.process_count() == 1:
        return jax.device_put(batch, sharding)
    if whole:
        return {
            k: jax.make_array_from_process_local_data(sharding, np.asarray(v), np.shape(v))
            for k, v in batch.items()
        }
    return to_global(batch, sharding)


def fetch(x) -> np.ndarray:
    """A global array's whole value on every process (an all-gather across processes)."""
    if not isinstance(x, jax.Array) or x.is_fully_addressable or x.is_fully_replicated:
        return np.asarray(x)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
