"""Deterministic, resumable, multi-process iteration over a tokenised shard.

Each process holds only its own contiguous shard (`encoding.tokenize_rows` with the same
``process_index``/``process_count``) and yields host-local batch dicts (`batch`);
`to_global` turns one into global ``jax.Array``s with
``jax.make_array_from_process_local_data`` (groups are self-contained, so no index changes).

Epoch ``e`` uses the permutation ``default_rng([seed, e, process_index])`` of the shard and a
plan (`packing`) that is a pure function of it, so the iterator state is just
``{"epoch", "step"}`` (plus a fingerprint that refuses a resume on other data or another
layout): `get_state` is JSON-serialisable and `set_state` continues with exactly the next
batch. Processes agree once per epoch, through ``allgather``, on the number of batches (the
minimum: a process with more batches drops its last ones) and, for the padded layout, on
each batch's row length (the maximum). The default ``allgather`` is
``jax.experimental.multihost_utils.process_allgather`` when several processes run; so with
several processes, construct the iterator, call ``next`` and ``steps_per_epoch`` on every
process alike (they may run a collective).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable

import jax
import numpy as np

from mipo_jax.data import packing
from mipo_jax.data.encoding import Tokenized
from mipo_jax.data.packing import Layout

AllGather = Callable[[np.ndarray], np.ndarray]  # local [n] int64 -> [P, n] from all processes


def default_allgather(process_count: int) -> AllGather:
    """Identity for one process, else jax's process_allgather (a collective: all must call)."""
    if process_count == 1:
        return lambda x: np.asarray(x)[None]
    from jax.experimental import multihost_utils

    return lambda x: np.asarray(multihost_utils.process_allgather(np.asarray(x)))


class PreferenceIterator:
    """Yields host-local batch dicts (numpy) for ``num_epochs`` epochs (None = forever)."""

    def __init__(
        self,
        data: Tokenized,
        layout: Layout,
        *,
        seed: int = 0,
        num_epochs: int | None = None,
        drop_remainder: bool = True,
        process_index: int | None = None,
        process_count: int | None = None,
        allgather: AllGather | None = None,
    ):
        self.data, self.layout, self.seed = data, layout, int(seed)
        self.num_epochs, self.drop_remainder = num_epochs, drop_remainder
        self.process_index = jax.process_index() if process_index is None else process_index
        self.process_count = jax.process_count() if process_count is None else process_count
        self.allgather = allgather or default_allgather(self.process_count)
        self.units = packing.unit_lengths(data, layout.kind)
        self.need = packing.padded_need(data)
        _, comp = data.lengths()
        longest = comp.max()
        self.width = int(
            layout.completion_width or _agree_max(self.allgather, -(-longest // 8) * 8)
        )
        if longest > self.width:
            raise ValueError(f"a completion has {longest} tokens > completion_width {self.width}")
        self.slots = 1  # padded: one example per group
        if layout.packed:
            self.slots = layout.max_pairs or _agree_max(self.allgather, self._default_slots())
        self.epoch, self.step = 0, 0
        self._plan_epoch: int | None = None
        self._plan: list = []
        self._lengths: list[int] = []

    def _default_slots(self) -> int:
        """1.25x the examples an average group holds, rounded up to a multiple of 8."""
        per_example = max(float(self.units.sum(axis=1).mean()), 1.0)
        capacity = self.layout.rows * self.layout.row_length
        return -(-int(1.25 * capacity / per_example + 1) // 8) * 8

    # -- state ---------------------------------------------------------------------------

    def fingerprint(self) -> str:
        """Hash of what decides the batch stream (data lengths, ids, layout, seed)."""
        h = hashlib.sha256()
        for a in (self.units, self.data.example_id):
            h.update(np.ascontiguousarray(a).tobytes())
        h.update(
            repr((self.layout, self.seed, self.drop_remainder, self.slots, self.width)).encode()
        )
        h.update(repr((self.process_index, self.process_count)).encode())
        return h.hexdigest()[:16]

    def get_state(self) -> dict:
        """Small JSON-serialisable state: resume yields exactly the next batch."""
        return {"epoch": self.epoch, "step": self.step, "fingerprint": self.fingerprint()}

    def set_state(self, state: dict) -> None:
        if state.get("fingerprint") not in (None, self.fingerprint()):
            raise ValueError(
                "iterator state was saved for other data, layout, seed or process layout "
                f"(fingerprint {state['fingerprint']} != {self.fingerprint()})"
            )
        self.epoch, self.step = int(state["epoch"]), int(state["step"])

    # -- planning ------------------------------------------------------------------------

    def _order(self, epoch: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, epoch, self.process_index])
        return rng.permutation(len(self.data))

    def plan(self, epoch: int) -> tuple[list, list[int]]:
        """(batches, row length of each) of ``epoch``, agreed across processes."""
        if self._plan_epoch != epoch:
            order = self._order(epoch)
            if self.layout.packed:
                plan = packing.plan_packed(
                    self.units, order, self.layout, self.slots, drop_remainder=self.drop_remainder
                )
                lengths = [self.layout.row_length] * len(plan)
            else:
                rng = np.random.default_rng([self.seed, epoch, self.process_index, 1])
                plan, lengths = packing.plan_padded(
                    self.need, order, self.layout, rng, drop_remainder=self.drop_remainder
                )
            counts = self.allgather(np.asarray([len(plan)], np.int64))[:, 0]
            n = int(counts.min())
            if not self.layout.packed and self.process_count > 1:
                padded = np.zeros(int(counts.max()), np.int64)
                padded[: len(lengths)] = lengths
                lengths = self.allgather(padded).max(axis=0)[:n].tolist()
            self._plan_epoch, self._plan, self._lengths = epoch, plan[:n], lengths[:n]
        return self._plan, self._lengths

    def steps_per_epoch(self, epoch: int | None = None) -> int:
        return len(self.plan(self.epoch if epoch is None else epoch)[0])

    # -- iteration -----------------------------------------------------------------------

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        while True:
            if self.num_epochs is not None and self.epoch >= self.num_epochs:
                raise StopIteration
            plan, lengths = self.plan(self.epoch)
            if self.step < len(plan):
                break
            if not plan:
                raise ValueError("an epoch has no batch: fewer examples than batch_size?")
            self.epoch, self.step = self.epoch + 1, 0
        entry, length = plan[self.step], lengths[self.step]
        self.step += 1
        if self.layout.packed:
            return packing.assemble_packed(self.data, entry, self.layout, self.slots, self.width)
        return packing.assemble_padded(self.data, entry, self.layout.batch_size, length, self.width)


def _agree_max(allgather: AllGather, value: int) -> int:
    return int(allgather(np.asarray([value], np.int64)).max())


def to_global(batch: dict, sharding: jax.sharding.Sharding) -> dict:
    """Host-local batch -> global ``jax.Array``s; the group axis is split across processes.

    ``sharding`` shards the leading (group) axis, e.g. ``NamedSharding(mesh, P(("data",
    "fsdp")))``; each process's local groups become its block of the global batch.
    """
    return {
        k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in batch.items()
    }
