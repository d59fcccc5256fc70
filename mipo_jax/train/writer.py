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
"""

import json
import logging
import math
import os
import time

import jax

log = logging.getLogger("mipo_jax.train")
DROPPED = "metrics.dropped.jsonl"

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
        self.path = os.path.join(workdir, "metrics.jsonl")
        self._tb = None
        if self.enabled:
            os.makedirs(workdir, exist_ok=True)
            rewind(self.path, start, end)
            if tensorboard:
                from tensorboardX import SummaryWriter

                purge = start if start in (0, end) else start + 1
                self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"), purge_step=purge)

    def write(self, step: int, values: dict[str, float], split: str = "train") -> None:
        if not self.enabled or not values:
            return
        prefix = "" if split == "train" else f"{split}_"
        row = {"step": int(step), "split": split, "time": round(time.time(), 3)}
        row.update({prefix + k: _finite_or_str(v) for k, v in sorted(values.items())})
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self._tb is not None:
            for k, v in values.items():
                self._tb.add_scalar(prefix + k, float(v), int(step))

    def flush(self) -> None:
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
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
    if not os.path.exists(path):
        return 0
    with open(path, "rb") as f:
        lines = [line for line in f if line.strip()]
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
    with open(os.path.join(os.path.dirname(path), DROPPED), "ab") as f:
        f.writelines(moved)  # first, so that a crash in between loses nothing
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.writelines(keep)
    os.replace(tmp, path)
    log.warning(
        "%s: moved %d rows after step %d (the run resumes there) and %d unreadable line(s) "
        "to %s", path, len(moved) - torn, start, torn, DROPPED,
    )  # fmt: skip
    return len(moved)


def read_metrics(path: str) -> list[dict]:
    """The rows of a metrics file; lines that do not parse (a torn last line) are skipped."""
    with open(path, "rb") as f:
        lines = [line if line.endswith(b"\n") else line + b"\n" for line in f if line.strip()]
    rows = [_row(line) for line in lines]
    bad = sum(r is None for r in rows)
    if bad:
        log.warning("%s: skipped %d line(s) that do not parse", path, bad)
    return [r for r in rows if r is not None]


def plot(metrics_path: str, png_path: str, curves=MAIN_CURVES) -> str | None:
    """A grid of the main curves (train and eval) as PNG; None when nothing was logged."""
    if not os.path.exists(metrics_path):
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
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
    return png_path
