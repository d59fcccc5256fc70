"""Batch plans (which examples go where) and their assembly into batch dicts (`batch`).

A plan is a pure function of the example lengths and an order (a shuffled permutation), so
an epoch's plan can be recomputed from ``(seed, epoch)`` on resume. Three layouts:

* ``padded``: ``batch_size`` examples per batch, one row per sequence, padded to the longest
  sequence of the batch rounded up to ``length_multiple`` (or to a fixed ``row_length``).
  ``bucket_window > 0`` sorts windows of ``bucket_window`` batches by length before cutting
  them into batches, whose order is then shuffled (length bucketing).
* ``pairs``: groups of ``rows`` rows of ``row_length`` tokens; the next ``lookahead`` queued
  examples are placed best-fit decreasing (a pair's sequences always share a group), those
  that did not fit stay, in order, at the front of the queue. ``groups`` groups make a batch.
* ``shared_prompt``: as ``pairs``, with one unit per example: ``prompt | chosen | rejected``.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from mipo_jax.data.batch import LAYOUTS
from mipo_jax.data.encoding import Tokenized


@dataclasses.dataclass(frozen=True)
class Layout:
    """How examples become batches (sizes per process; see `iterator` for the global batch)."""

    kind: str = "padded"
    batch_size: int = 8  # padded: examples per batch
    rows: int = 8  # packed: rows per group
    groups: int = 1  # packed: groups per batch
    row_length: int | None = None  # packed: T (required); padded: fixed T, None = per batch
    max_pairs: int | None = None  # packed: example slots per group; None = from the data
    length_multiple: int = 8  # padded: round T up to a multiple of this
    bucket_window: int = 0  # padded: batches per sorting window; 0 = no bucketing
    lookahead: int | None = None  # packed: examples considered per group; None = 4x a group
    completion_width: int | None = None  # C; None = longest completion, rounded up to 8

    def __post_init__(self):
        if self.kind not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {self.kind!r}")
        if self.kind != "padded" and not self.row_length:
            raise ValueError(f"layout {self.kind!r} needs row_length")

    @property
    def packed(self) -> bool:
        return self.kind != "padded"


def _round_up(n: int, m: int) -> int:
    return -(-int(n) // m) * m


def unit_lengths(data: Tokenized, kind: str) -> np.ndarray:
    """``[N, units]``: per example, the lengths of what gets placed in rows."""
    p, c = data.lengths()
    if kind == "shared_prompt":
        return (p + c.sum(axis=1))[:, None]
    return p[:, None] + c  # one sequence per completion


def padded_need(data: Tokenized) -> np.ndarray:
    """``[N, 2]``: (prompt, completion) tokens that decide a padded batch's row length."""
    p, c = data.lengths()
    if data.label is not None:  # unpaired: KL rows pair a prompt with another completion
        return np.stack([p, c[:, 0]], axis=1)
    return np.stack([np.zeros_like(p), (p[:, None] + c).max(axis=1)], axis=1)


def plan_padded(
    need: np.ndarray,
    order: np.ndarray,
    layout: Layout,
    rng: np.random.Generator,
    *,
    drop_remainder: bool,
) -> tuple[list[np.ndarray], list[int]]:
    """(batches of example indices, row length T of each) for the padded layout.

    ``need`` is `padded_need`: a batch's T covers ``max(need[:, 0]) + max(need[:, 1])``.
    """
    b = layout.batch_size
    if drop_remainder:
        order = order[: len(order) // b * b]
    longest = need.sum(axis=1)
    window = layout.bucket_window * b
    chunks: list[np.ndarray] = []
    for w in range(0, len(order), window or len(order) or 1):
        win = order[w : w + window] if window else order
        if window:
            win = win[np.argsort(longest[win], kind="stable")]
        chunks += [win[j : j + b] for j in range(0, len(win), b)]
    if window:
        chunks = [chunks[i] for i in rng.permutation(len(chunks))]
    if layout.row_length:
        lengths = [layout.row_length] * len(chunks)
    else:
        lengths = [_round_up(need[ch].max(axis=0).sum(), layout.length_multiple) for ch in chunks]
    return chunks, lengths


Placement = tuple[int, list[tuple[int, int]]]  # (example, [(row, offset) per unit])


def plan_packed(
    units: np.ndarray, order: np.ndarray, layout: Layout, max_pairs: int, *, drop_remainder: bool
) -> list[list[list[Placement]]]:
    """Batches (lists of ``layout.groups`` groups) of placements for the packed layouts.

    With ``drop_remainder`` the group that empties the queue (filled from leftovers only) and
    a final incomplete batch are dropped, as the padded layout drops its last partial batch.
    """
    length = layout.row_length
    too_long = np.flatnonzero(units.max(axis=1) > length)
    if len(too_long):
        i = int(too_long[0])
        raise ValueError(
            f"example {i} needs {int(units[i].max())} tokens in one row but row_length="
            f"{length}; raise row_length or lower max_length ({len(too_long)} such examples)"
        )
    sizes = units.sum(axis=1)
    window = layout.lookahead or max(64, 4 * int(layout.rows * length / max(sizes.mean(), 1)))
    unit_list, size_list, smallest = units.tolist(), sizes.tolist(), int(units.min())
    queue = [int(i) for i in order]
    groups: list[list[Placement]] = []
    while queue:
        head = queue[:window]
        fill = [0] * layout.rows
        placed = []
        for i in sorted(head, key=lambda i: -size_list[i]):  # best-fit decreasing (stable)
            spots = _best_fit(unit_list[i], fill, length)
            if spots is not None:
                placed.append((i, spots))
                if len(placed) == max_pairs or length - min(fill) < smallest:
                    break
        taken = {i for i, _ in placed}
        queue = [i for i in head if i not in taken] + queue[window:]
        if queue or not drop_remainder or not groups:
            groups.append(placed)
    g = layout.groups
    n = len(groups) // g if drop_remainder and len(groups) >= g else -(-len(groups) // g)
    return [groups[j * g : (j + 1) * g] for j in range(n)]


def _best_fit(sizes: list[int], fill: list[int], length: int) -> list[tuple[int, int]] | None:
    """Place every unit (or none) in the fullest row with room; updates ``fill`` on success."""
    trial = list(fill)
    spots = []
    for s in sizes:
        best = -1
        for r, f in enumerate(trial):
            if f + s <= length and (best < 0 or f > trial[best]):
                best = r
        if best < 0:
            return None
        spots.append((best, trial[best]))
        trial[best] += s
    fill[:] = trial
    return spots


class Assembler:
    """Writes examples into the arrays of one batch dict (see `batch`)."""

    def __init__(self, data: Tokenized, kind: str, shape: tuple[int, int, int, int], width: int):
        g, k, t, p = shape
        s = data.num_completions
        self.data, self.kind, self.length = data, kind, t
        self.out = {
            "tokens": np.full((g, k, t), data.pad_id, np.int32),
            "segment_ids": np.zeros((g, k, t), np.int32),
            "positions": np.zeros((g, k, t), np.int32),
            "pred_index": np.zeros((g, p, s, width), np.int32),
            "targets": np.full((g, p, s, width), data.pad_id, np.int32),
            "mask": np.zeros((g, p, s, width), np.float32),
            "pair_valid": np.zeros((g, p), np.float32),
            "example_id": np.full((g, p), -1, np.int32),
        }
        if kind == "shared_prompt":
            self.out["attend_to"] = np.zeros((g, k, t), np.int32)
        if data.ref_logps is not None:
            self.out["ref_logps"] = np.zeros((g, p, s), np.float32)
        if data.label is not None:
            self.out["label"] = np.zeros((g, p), np.float32)
        self.next_segment = np.ones((g, k), np.int32)

    def _write(
        self, g: int, row: int, off: int, ids, pos0: int, attend_to: int = 0
    ) -> tuple[int, int]:
        """Write one segment; returns (its segment id, the offset after it)."""
        seg = int(self.next_segment[g, row])
        self.next_segment[g, row] += 1
        end = off + len(ids)
        o = self.out
        o["tokens"][g, row, off:end] = ids
        o["segment_ids"][g, row, off:end] = seg
        o["positions"][g, row, off:end] = np.arange(pos0, pos0 + len(ids))
        if attend_to:
            o["attend_to"][g, row, off:end] = attend_to
        return seg, end

    def _slot(self, g: int, slot: int, side: int, index: np.ndarray, comp) -> None:
        n = len(comp)
        if n > self.out["targets"].shape[-1]:
            raise ValueError(f"a completion of {n} tokens exceeds completion_width")
        self.out["pred_index"][g, slot, side, :n] = index
        self.out["targets"][g, slot, side, :n] = comp
        self.out["mask"][g, slot, side, :n] = 1.0

    def add(self, g: int, slot: int, prompt, comps, spots: list[tuple[int, int]]) -> None:
        """Write one example (prompt, completions) into slot ``slot`` of group ``g``."""
        t, p = self.length, len(prompt)
        if self.kind == "shared_prompt":
            (row, off) = spots[0]
            seg, end = self._write(g, row, off, prompt, 0)
            for side, comp in enumerate(comps):
                last_prompt = row * t + off + p - 1
                self._slot(
                    g,
                    slot,
                    side,
                    np.r_[last_prompt, row * t + end + np.arange(len(comp) - 1)],
                    comp,
                )
                _, end = self._write(g, row, end, comp, p, attend_to=seg)
            return
        for side, ((row, off), comp) in enumerate(zip(spots, comps)):
            self._slot(g, slot, side, row * t + off + p - 1 + np.arange(len(comp)), comp)
            self._write(g, row, off, np.concatenate([prompt, comp]), 0)

    def meta(self, g: int, slot: int, i: int) -> None:
        """Mark slot ``(g, slot)`` as holding example ``i``."""
        d, o = self.data, self.out
        o["pair_valid"][g, slot] = 1.0
        o["example_id"][g, slot] = d.example_id[i]
        if d.ref_logps is not None:
            o["ref_logps"][g, slot] = d.ref_logps[i]
        if d.label is not None:
            o["label"][g, slot] = float(d.label[i])


def _example(data: Tokenized, i: int):
    return data.prompt[i], [c[i] for c in data.completions]


def assemble_padded(
    data: Tokenized, examples, batch_size: int, length: int, width: int, *, start: int = 0
) -> dict:
    """Groups ``examples[start : start + batch_size]`` of a padded batch (row s: side s).

    ``examples`` is the whole (global) batch; a process assembles its block of it from
    ``start``. Missing examples (a short last batch) leave empty groups.
    """
    s = data.num_completions
    mine = [int(i) for i in examples[start : start + batch_size]]
    a = Assembler(data, "padded", (batch_size, s, length, 1), width)
    for j, i in enumerate(mine):
        a.add(j, 0, *_example(data, i), [(side, 0) for side in range(s)])
        a.meta(j, 0, i)
    out = a.out
    if data.label is not None and len(examples):  # KTO's mismatched pairs, global cycle
        kl = Assembler(data, "padded", (batch_size, 1, length, 1), width)
        for j, i in enumerate(mine):
            other = int(examples[(start + j + 1) % len(examples)])
            kl.add(j, 0, data.prompt[i], [data.completions[0][other]], [(0, 0)])
        keys = ("tokens", "segment_ids", "positions", "pred_index", "targets", "mask")
        out.update({f"kl_{k}": kl.out[k] for k in keys})
    return out


def assemble_packed(
    data: Tokenized, groups: list[list[Placement]], layout: Layout, slots: int, width: int
) -> dict:
    """A packed batch from one `plan_packed` entry (missing groups stay empty)."""
    a = Assembler(data, layout.kind, (layout.groups, layout.rows, layout.row_length, slots), width)
    for g, placed in enumerate(groups):
        for slot, (i, spots) in enumerate(placed):
            a.add(g, slot, *_example(data, i), spots)
            a.meta(g, slot, i)
    return a.out
