"""Step batches from the data pipeline: G groups per step, global arrays, resumable state.

Thin adapter over `mipo_jax.data` (which yields host-local batches in the step's group
layout). It adds what a training run needs on top:

* the global batch size: ``config.batch_size`` pairs per step for the padded layout (one
  iterator batch of ``batch_size / process_count`` examples per process); for packed layouts
  ``config.data.groups`` packed groups (iterator batches) per step and process;
* KTO on a paired set: each pair becomes a desirable (chosen) and an undesirable (rejected)
  row, as TRL's ``unpair_preference_dataset`` does;
* which reference log-probs reach the step: the dataset's own columns only with
  ``reference.mode = "dataset"``, the on-disk cache with ``"cached"``;
* a global iterator state (the same on every process) for checkpoints.
"""

import copy

import jax
import ml_collections as mlc
import numpy as np

from mipo_jax.data import to_global
from mipo_jax.data.embedded import load_tokenizer
from mipo_jax.data.iterator import PreferenceIterator
from mipo_jax.data.load import Rows
from mipo_jax.data.pipeline import layout_of, tokenize_split, tokenizer_name

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


def data_section(config, split: str) -> mlc.ConfigDict:
    """The ``data`` section for one split with per-process batch sizes filled in."""
    d = copy.deepcopy(config.data)
    with d.unlocked():
        d.split = split
        if d.layout == "padded":
            n = jax.process_count()
            if config.batch_size % n:
                raise ValueError(
                    f"batch_size={config.batch_size} does not split over {n} processes"
                )
            d.batch_size = config.batch_size // n
        if d.format == "auto" and config.objective == "unpaired":
            d.format = "unpaired"
    return d


def tokenize(d: mlc.ConfigDict, tokenizer, *, unpaired: bool):
    """This process's tokenised shard of the split described by ``d``."""

    def transform(rows: Rows) -> Rows:
        return unpair(rows) if unpaired and "completion" not in rows.column_names else rows

    return tokenize_split(
        d, tokenizer, process_index=jax.process_index(), process_count=jax.process_count(),
        transform=transform,
    )  # fmt: skip


class StepData:
    """Iterator of step batches (host-local numpy; `to_device` makes them global)."""

    def __init__(self, config, split: str, *, tokenizer=None, num_epochs=None, seed=None):
        self.config = config
        d = data_section(config, split)
        with d.unlocked():
            if num_epochs is not None:
                d.num_epochs = num_epochs
            if seed is not None:
                d.seed = seed
        self.section = d
        self.tokenizer = tokenizer or load_tokenizer(tokenizer_name(d))
        self.data = tokenize(d, self.tokenizer, unpaired=config.objective == "unpaired")
        self.iterator = PreferenceIterator(
            self.data, layout_of(d), seed=d.seed, num_epochs=d.num_epochs,
            drop_remainder=d.drop_remainder,
        )  # fmt: skip
        self.keep_dataset_ref = config.reference.mode == "dataset"
        self.cache = None  # a ReferenceCache, attached by the loop in "cached" mode

    @property
    def width(self) -> int:
        return self.iterator.width

    @property
    def max_length(self) -> int:
        p, c = self.data.lengths()
        return int((p + c.max(axis=1)).max())

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        batch = next(self.iterator)  # already holds data.groups groups (packed layouts)
        if self.cache is not None:
            batch = self.cache.attach(batch)
        elif not self.keep_dataset_ref:
            batch.pop("ref_logps", None)
        if "label" in batch:
            batch["label"] = np.asarray(batch["label"], np.float32)
        return batch

    def get_state(self) -> dict:
        """Global position (equal on every process; the shard fingerprint stays local)."""
        s = self.iterator.get_state()
        return {"epoch": int(s["epoch"]), "step": int(s["step"])}

    def set_state(self, state: dict) -> None:
        self.iterator.set_state({"epoch": state["epoch"], "step": state["step"]})


def to_device(batch: dict, sharding) -> dict:
    """Global arrays sharded on the group axis; host-only fields are dropped."""
    batch = {k: v for k, v in batch.items() if k not in HOST_ONLY}
    if jax.process_count() == 1:
        return jax.device_put(batch, sharding)
    return to_global(batch, sharding)
