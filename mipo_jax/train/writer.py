"""What the user sees: JSON-lines metrics, TensorBoard events, a progress bar, a PNG plot.

Only process 0 writes. ``metrics.jsonl`` has one object per logged step,
``{"step": 10, "split": "train", "loss": 0.69, ...}``; evaluation rows have ``split: "eval"``
and their metrics carry TRL's ``eval_`` prefix (``eval_loss``, ``eval_rewards/margins``, the
exact task metrics as ``eval_true/reward``), in metrics.jsonl and TensorBoard alike;
TensorBoard event files go to ``<workdir>/tensorboard``; `plot` draws the main curves.

A run that resumes from step s keeps the rows it will not write again and moves the others
(every row after s, the eval row at s when s is the first or last step, and a line torn by
a crash mid-write) to ``metrics.dropped.jsonl`` next to it, so ``metrics.jsonl`` holds each
row once; TensorBoard is told to purge its events from the same step on. Readers skip lines
that do not parse.

An object-store workdir (``gs://...``, `mipo_jax.paths`) cannot append: ``metrics.jsonl``
is kept in memory and uploaded whole at most every `SYNC_SECS` seconds while rows come, and
on `sync` (before every checkpoint, so a checkpoint's rows are in the object), `flush` and
`close`; a crash loses at most the rows since the last upload, and a resume rewinds as above.
TensorBoard event files are uploaded whole on each TensorBoard flush (`_ObjectRecordWriter`).
"""

import io
import json
import logging
import math
import time

import jax

from mipo_jax import paths

log = logging.getLogger("mipo_jax.train")
DROPPED = "metrics.dropped.jsonl"
SYNC_SECS = 30.0  # object-store workdirs: upload metrics.jsonl at most this often while writing

MAIN_CURVES = (
    "loss",
    "rewards/margins",
    "rewards/accuracies",
    "logps/chosen",
    "logps/rejected",
    "grad_norm",
)


class MetricWriter:
    """Appends rows to ``<workdir>/metrics.jsonl`` and TensorBoard (process 0 only).

    ``start``: the step the run starts from (0, or a restored checkpoint's step), and
    ``end`` its last step: rows the run will write again are moved aside first (`rewind`).
    """

    def __init__(
        self, workdir: str, *, tensorboard: bool = True, start: int = 0, end: int | None = None
    ):
        self.enabled = jax.process_index() == 0
        self.path = paths.join(workdir, "metrics.jsonl")
        self._tb = None
        self._remote = paths.is_remote(workdir)
        self._content, self._synced, self._last_sync = bytearray(), True, time.monotonic()
        if self.enabled:
            paths.makedirs(workdir)
            rewind(self.path, start, end)
            if self._remote and paths.exists(self.path):
                self._content = bytearray(paths.read_bytes(self.path))
            if tensorboard:
                from tensorboardX import SummaryWriter

                if self._remote:
                    register_tensorboard_schemes()
                purge = start if start in (0, end) else start + 1
                self._tb = SummaryWriter(paths.join(workdir, "tensorboard"), purge_step=purge)

    def write(self, step: int, values: dict[str, float], split: str = "train") -> None:
        if not self.enabled or not values:
            return
        prefix = "" if split == "train" else f"{split}_"
        row = {"step": int(step), "split": split, "time": round(time.time(), 3)}
        row.update({prefix + k: _finite_or_str(v) for k, v in sorted(values.items())})
        line = json.dumps(row) + "\n"
        if self._remote:
            self._content += line.encode()
            self._synced = False
            if time.monotonic() - self._last_sync >= SYNC_SECS:
                self.sync()
        else:
            with open(self.path, "a") as f:
                f.write(line)
        if self._tb is not None:
            for k, v in values.items():
                self._tb.add_scalar(prefix + k, float(v), int(step))

    def sync(self) -> None:
        """Object-store workdirs: upload ``metrics.jsonl`` now if rows are pending (local
        files are written row by row: nothing to do)."""
        if self.enabled and self._remote and not self._synced:
            paths.write_bytes(self.path, bytes(self._content))
            self._synced, self._last_sync = True, time.monotonic()

    def flush(self) -> None:
        self.sync()
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        self.sync()
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def _finite_or_str(v: float):
    v = float(v)
    return v if math.isfinite(v) else str(v)


def _row(line: bytes) -> dict | None:
    """The row a complete line holds, or None (a torn or otherwise unreadable line)."""
    if not line.endswith(b"\n"):
        return None
    try:
        row = json.loads(line)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    return row if isinstance(row, dict) and isinstance(row.get("step"), int) else None


def superseded(row: dict, start: int, end: int | None) -> bool:
    """Whether a run starting at ``start`` (and ending at ``end``) writes this row again."""
    step = row["step"]
    return step > start or (row.get("split") != "train" and step == start and step in (0, end))


def rewind(path: str, start: int, end: int | None = None) -> int:
    """Move the rows a run starting at ``start`` will write again, and unreadable lines (a
    line torn by a crash mid-write), from ``path`` to ``metrics.dropped.jsonl`` beside it;
    returns how many lines moved. The kept rows are rewritten atomically."""
    if not paths.exists(path):
        return 0
    lines = [line for line in io.BytesIO(paths.read_bytes(path)) if line.strip()]
    keep, moved, torn = [], [], 0
    for line in lines:
        row = _row(line)
        if row is None:
            torn += 1
            moved.append(line if line.endswith(b"\n") else line + b"\n")
        elif superseded(row, start, end):
            moved.append(line)
        else:
            keep.append(line)
    if not moved:
        return 0
    # first, so that a crash in between loses nothing
    paths.append_bytes(paths.join(paths.dirname(path), DROPPED), b"".join(moved))
    paths.write_bytes(path, b"".join(keep), tmp=".tmp")
    log.warning(
        "%s: moved %d rows after step %d (the run resumes there) and %d unreadable line(s) "
        "to %s", path, len(moved) - torn, start, torn, DROPPED,
    )  # fmt: skip
    return len(moved)


def read_metrics(path: str) -> list[dict]:
    """The rows of a metrics file; lines that do not parse (a torn last line) are skipped."""
    f = io.BytesIO(paths.read_bytes(path))
    lines = [line if line.endswith(b"\n") else line + b"\n" for line in f if line.strip()]
    rows = [_row(line) for line in lines]
    bad = sum(r is None for r in rows)
    if bad:
        log.warning("%s: skipped %d line(s) that do not parse", path, bad)
    return [r for r in rows if r is not None]


def plot(metrics_path: str, png_path: str, curves=MAIN_CURVES) -> str | None:
    """A grid of the main curves (train and eval) as PNG; None when nothing was logged."""
    if not paths.exists(metrics_path):
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(metrics_path)
    present = [c for c in curves if any(c in r or f"eval_{c}" in r for r in rows)]
    extra = sorted({k.removeprefix("eval_") for r in rows for k in r if "true/" in k})
    present += [k for k in extra if k not in present]
    if not present:
        return None
    cols = min(3, len(present))
    nrows = -(-len(present) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3.0 * nrows), squeeze=False)
    for ax, name in zip(axes.flat, present):
        for key, label in ((name, "train"), (f"eval_{name}", "eval")):
            pts = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), float | int)]
            if pts:
                xs, ys = zip(*pts)
                ax.plot(xs, ys, marker="." if len(pts) < 30 else None, label=label)
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(present) :]:
        ax.axis("off")
    fig.tight_layout()
    if paths.is_remote(png_path):
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=100)
        paths.write_bytes(png_path, buf.getvalue())
    else:
        fig.savefig(png_path, dpi=100)
    plt.close(fig)
    return png_path


class _ObjectRecordWriter:
    """A TensorBoard event file on an object store: the bytes are kept in memory and the
    whole object is uploaded on each flush (as tensorboardX's own GCS writer does), through
    `mipo_jax.paths`."""

    def __init__(self, path: str):
        self.path, self.buffer, self.written = path, io.BytesIO(), -1

    def write(self, data: bytes) -> None:
        self.buffer.write(data)

    def flush(self) -> None:
        if self.buffer.tell() != self.written:
            paths.write_bytes(self.path, self.buffer.getvalue())
            self.written = self.buffer.tell()

    def close(self) -> None:
        self.flush()


class _ObjectRecordWriterFactory:
    def open(self, path: str) -> _ObjectRecordWriter:
        return _ObjectRecordWriter(path)

    def directory_check(self, path: str) -> None:
        paths.makedirs(path)


def register_tensorboard_schemes() -> None:
    """Route tensorboardX's ``gs://``, ``s3://`` and ``az://`` event files through
    `mipo_jax.paths` (instead of its own boto / google-cloud-storage clients)."""
    from tensorboardX import record_writer

    for scheme in ("gs", "s3", "az"):
        record_writer.register_writer_factory(scheme, _ObjectRecordWriterFactory())
