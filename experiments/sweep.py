"""A grid of config overrides → one trainer run each, in its own workdir → one results list.

    from experiments import sweep

    runs = sweep.run_grid(
        lambda: mipo_jax.get_config("dpo", tiny=True),
        sweep.grid(**{"loss.alpha": [0.1, 0.5], "seed": [0, 1, 2]}),
        "runs/frontier/dpo",
    )
    print(sweep.table(runs, ["loss.alpha", "seed"], ["eval_after.true/reward"]))

Every run trains through `mipo_jax.run` (the code path of ``python -m mipo_jax.main``) in
``<out>/<name>``, where ``name`` spells the overrides. A run whose workdir already holds a
``summary.json`` written for the same overrides is not trained again: its summary is reused,
so an interrupted sweep resumes where it stopped (a run cut off mid-way resumes from its own
checkpoints). A run stopped by SIGTERM (the trainer saves and returns a ``stopped`` summary)
stops the sweep with `Stopped`, instead of going on to the next run.
"""

import copy
import itertools
import json
import os
import re
import time
from collections.abc import Callable, Iterable
from typing import Any

OVERRIDES_FILE = "overrides.json"


class Stopped(RuntimeError):
    """A run of the sweep was stopped (SIGTERM); running the sweep again resumes it."""


def grid(**axes: Iterable) -> list[dict[str, Any]]:
    """The cartesian product of ``{dotted.key: values}`` as a list of override dicts."""
    keys = list(axes)
    return [dict(zip(keys, values)) for values in itertools.product(*axes.values())]


def apply(config, overrides: dict[str, Any]):
    """A copy of ``config`` with ``{"loss.alpha": 0.1, ...}`` set (keys must exist)."""
    config = copy.deepcopy(config)
    for dotted, value in overrides.items():
        *path, leaf = dotted.split(".")
        node = config
        for part in path:
            node = node[part]
        if leaf not in node:
            raise KeyError(f"sweep override {dotted!r}: the config has no key {leaf!r} there")
        node[leaf] = value
    return config


def run_name(overrides: dict[str, Any]) -> str:
    """A readable, filesystem-safe name: ``loss.alpha=0.1,seed=2`` → ``alpha=0.1_seed=2``."""
    parts = [f"{k.rsplit('.', 1)[-1]}={v}" for k, v in overrides.items()]
    return re.sub(r"[^A-Za-z0-9_.=+-]", "-", "_".join(parts)) or "base"


def _finished(workdir: str, overrides: dict) -> dict | None:
    summary = os.path.join(workdir, "summary.json")
    recorded = os.path.join(workdir, OVERRIDES_FILE)
    if not (os.path.exists(summary) and os.path.exists(recorded)):
        return None
    with open(recorded) as f:
        if json.load(f) != json.loads(json.dumps(overrides)):
            raise ValueError(
                f"{workdir} holds a run with other overrides ({recorded}); use another out dir"
            )
    with open(summary) as f:
        return json.load(f)


def run_grid(
    base: Callable[[], Any],
    overrides: list[dict[str, Any]],
    out_dir: str,
    *,
    train: Callable[[Any, str], dict] | None = None,
    log: Callable[[str], None] = print,
) -> list[dict]:
    """Train every override set of ``overrides`` on ``base()``; finished runs are reused.

    Returns one dict per run: ``name``, ``overrides``, ``workdir``, ``config`` (the resolved
    config as a dict), ``summary`` (the trainer's summary) and ``reused`` (True when the
    summary came from an earlier, finished run).
    """
    if train is None:
        import mipo_jax

        train = mipo_jax.run
    results = []
    for i, ov in enumerate(overrides):
        name = run_name(ov)
        workdir = os.path.join(out_dir, name)
        config = apply(base(), ov)
        summary = _finished(workdir, ov)
        reused = summary is not None
        if not reused:
            os.makedirs(workdir, exist_ok=True)
            with open(os.path.join(workdir, OVERRIDES_FILE), "w") as f:
                json.dump(ov, f)
            start = time.time()
            summary = train(config, workdir)
            if summary.get("stopped"):
                raise Stopped(
                    f"{workdir}: stopped ({summary['stopped']}) at step {summary.get('step')}; "
                    "run the sweep again to resume"
                )
            log(f"[{i + 1}/{len(overrides)}] {name}: {time.time() - start:.0f} s")
        results.append(
            dict(name=name, overrides=ov, workdir=workdir, config=config.to_dict(),
                 summary=summary, reused=reused)
        )  # fmt: skip
    return results


def lookup(result: dict, dotted: str):
    """``"eval_after.true/reward"`` → ``result["summary"]["eval_after"]["true/reward"]``;
    override keys (``"loss.alpha"``) are looked up in ``result["overrides"]`` first."""
    if dotted in result["overrides"]:
        return result["overrides"][dotted]
    node = result["summary"]
    for part in dotted.split("."):
        node = node[part]
    return node


def table(results: list[dict], columns: list[str]) -> str:
    """A Markdown table with one row per run and the given (dotted) columns."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in results:
        cells = []
        for c in columns:
            v = lookup(r, c)
            cells.append(f"{v:.4g}" if isinstance(v, float) else str(v))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
