"""What the user sees: JSON-lines metrics, TensorBoard events, a progress bar, a PNG plot.

Only process 0 writes. ``metrics.jsonl`` has one object per logged step,
``{"step": 10, "split": "train", "loss": 0.69, ...}``; evaluation rows have ``split: "eval"``
and their metrics carry TRL's ``eval_`` prefix (``eval_loss``, ``eval_rewards/margins``, the
exact task metrics as ``eval_true/reward``), in metrics.jsonl and TensorBoard alike;
TensorBoard event files go to ``<workdir>/tensorboard``; `plot` draws the main curves.
"""

import json
import math
import os
import time

import jax

MAIN_CURVES = (
    "loss",
    "rewards/margins",
    "rewards/accuracies",
    "logps/chosen",
    "logps/rejected",
    "grad_norm",
)


class MetricWriter:
    def __init__(self, workdir: str, *, tensorboard: bool = True):
        self.enabled = jax.process_index() == 0
        self.path = os.path.join(workdir, "metrics.jsonl")
        self._tb = None
        if self.enabled:
            os.makedirs(workdir, exist_ok=True)
            if tensorboard:
                from tensorboardX import SummaryWriter

                self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

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


def read_metrics(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


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
