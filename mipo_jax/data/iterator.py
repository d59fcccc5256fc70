"""Deterministic, resumable, multi-process iteration: one global batch stream, sliced.

The batch stream is a pure function of the *global* dataset, the seed, the epoch and the
*global* batch shape, never of the process count: every process holds the whole tokenised
split (`encoding.tokenize_rows`), computes the same global plan, and assembles only its own
contiguous block of each global batch. ``Layout`` sizes are per process; with P processes a
global batch holds ``batch_size * P`` examples (padded) or ``groups * P`` packed groups, and
process p takes examples ``p*b .. (p+1)*b`` of it (padded, b = ``batch_size``) or groups
``p*G .. (p+1)*G`` (packed, G = ``groups``). So P processes with ``batch_size=b`` yield,
concatenated in process order, exactly the batches one process with ``batch_size=P*b``
yields (likewise ``groups``); `to_global` turns a process's block into global ``jax.Array``s
with ``jax.make_array_from_process_local_data`` and checks that the mesh gives this process
that block of rows. Nothing is exchanged between processes: every decision (row lengths,
batch counts, ``completion_width``, example slots) is computed from the global data alike.

Why every process tokenises every row: a process's block of a global batch holds arbitrary
examples of the shuffled dataset, and the plan needs every example's length after
truncation and bad-row filtering, which only tokenising gives. Tokenising a split costs
O(rows) per process instead of O(rows / P), seconds to minutes at the start of a run for
preference sets up to ~10^6 rows, and buys a stream that does not change with the number of
hosts, needs no collectives, and resumes across process counts.

Epoch ``e`` uses the permutation ``default_rng([seed, e, 0])`` of all examples (the trailing
0 keeps one-process streams identical to earlier versions) and a plan (`packing`) that is a
pure function of it, so the iterator state is just ``{"epoch", "step"}`` plus a fingerprint
of the data, the global layout and the seed: `get_state` is JSON-serialisable and the same
on every process, and `set_state` continues with exactly the next global batch, also in a
run with another process count but the same global batch (and refuses anything else).
"""

from __future__ import annotations

import dataclasses
import hashlib

import jax
import numpy as np

from mipo_jax.data import packing
from mipo_jax.data.encoding import Tokenized
from mipo_jax.data.packing import Layout
from mipo_jax.distributed import local_batch_slice


def global_layout(layout: Layout, process_count: int) -> Layout:
    """The layout of a global batch: per-process ``batch_size`` (padded) or ``groups`` x P."""
    if layout.packed:
        return dataclasses.replace(layout, groups=layout.groups * process_count)
    return dataclasses.replace(layout, batch_size=layout.batch_size * process_count)


class PreferenceIterator:
    """Yields this process's block (numpy) of each global batch, for ``num_epochs`` epochs.

    ``data`` must be the whole tokenised split (the same on every process); ``layout`` sizes
    are per process. ``num_epochs=None`` iterates forever.
    """

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
    ):
        self.data, self.layout, self.seed = data, layout, int(seed)
        self.num_epochs, self.drop_remainder = num_epochs, drop_remainder
        self.process_index = jax.process_index() if process_index is None else process_index
        self.process_count = jax.process_count() if process_count is None else process_count
        if not 0 <= self.process_index < self.process_count:
            raise ValueError(f"process_index {self.process_index} not in [0, {self.process_count})")
        self.global_layout = global_layout(layout, self.process_count)
        self.units = packing.unit_lengths(data, layout.kind)
        self.need = packing.padded_need(data)
        prompt, comp = data.lengths()
        for what, n in (("prompt", prompt), ("completion", comp.min(axis=1))):
            if (n < 1).any():  # a first completion token needs a prompt position to come from
                i = int(np.argmax(n < 1))
                raise ValueError(f"example {int(data.example_id[i])} has an empty {what}")
        longest = comp.max()
        self.width = int(layout.completion_width or -(-longest // 8) * 8)
        if longest > self.width:
            raise ValueError(f"a completion has {longest} tokens > completion_width {self.width}")
        self.slots = 1  # padded: one example per group
        if layout.packed:
            self.slots = layout.max_pairs or self._default_slots()
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
        """Hash of what decides the global batch stream (data, global layout, seed)."""
        h = hashlib.sha256()
        for a in (self.units, self.data.example_id):
            h.update(np.ascontiguousarray(a).tobytes())
        h.update(
            repr(
                (self.global_layout, self.seed, self.drop_remainder, self.slots, self.width)
            ).encode()
        )
        return h.hexdigest()[:16]

    def get_state(self) -> dict:
        """Small JSON-serialisable global state: resume yields exactly the next batch."""
        return {"epoch": self.epoch, "step": self.step, "fingerprint": self.fingerprint()}

    def set_state(self, state: dict) -> None:
        if state.get("fingerprint") not in (None, self.fingerprint()):
            raise ValueError(
                "iterator state was saved for other data, another global batch shape or "
                f"seed (fingerprint {state['fingerprint']} != {self.fingerprint()})"
            )
        self.epoch, self.step = int(state["epoch"]), int(state["step"])

    # -- planning ------------------------------------------------------------------------

    def _order(self, epoch: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, epoch, 0])
        return rng.permutation(len(self.data))

    def plan(self, epoch: int) -> tuple[list, list[int]]:
        """(global batches, row length of each) of ``epoch``; the same on every process."""
        if self._plan_epoch != epoch:
            order, lay = self._order(epoch), self.global_layout
            if lay.packed:
                plan = packing.plan_packed(
                    self.units, order, lay, self.slots, drop_remainder=self.drop_remainder
                )
                lengths = [lay.row_length] * len(plan)
            else:
                rng = np.random.default_rng([self.seed, epoch, 0, 1])
                plan, lengths = packing.plan_padded(
                    self.need, order, lay, rng, drop_remainder=self.drop_remainder
                )
            self._plan_epoch, self._plan, self._lengths = epoch, plan, lengths
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
                n = len(self.data)
                raise ValueError(
                    f"an epoch has no batch: {n} examples < the global batch "
                    f"({self.global_layout.batch_size} examples or "
                    f"{self.global_layout.groups} groups over {self.process_count} processes)?"
                )
            self.epoch, self.step = self.epoch + 1, 0
        entry, length = plan[self.step], lengths[self.step]
        self.step += 1
        lay, p = self.layout, self.process_index
        if lay.packed:
            mine = entry[p * lay.groups : (p + 1) * lay.groups]
            return packing.assemble_packed(self.data, mine, lay, self.slots, self.width)
        return packing.assemble_padded(
            self.data, entry, lay.batch_size, length, self.width, start=p * lay.batch_size
        )


def to_global(batch: dict, sharding: jax.sharding.NamedSharding) -> dict:
    """This process's block of a batch -> global ``jax.Array``s (group axis split).

    ``sharding`` shards the leading (group) axis, e.g. ``NamedSharding(mesh, P(("data",
    "fsdp")))``. Process p's block must be rows ``p*g .. (p+1)*g`` of the global batch (g
    local groups), which is what the mesh gives when it orders devices process by process;
    anything else is refused rather than silently reordering the batch.
    """
    g, p = next(iter(batch.values())).shape[0], jax.process_index()
    rows = local_batch_slice(g * jax.process_count(), sharding.mesh, sharding.spec)
    if (rows.start, rows.stop) != (p * g, (p + 1) * g):
        raise ValueError(
            f"the mesh gives process {p} rows [{rows.start}, {rows.stop}) of the global batch "
            f"but its data block is rows [{p * g}, {(p + 1) * g}): order the mesh's devices "
            "process by process along the batch axes"
        )
    return {
        k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in batch.items()
    }
