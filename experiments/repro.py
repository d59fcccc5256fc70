"""Shared plumbing of the reproductions: command line, mean ± std, results files.

    python -m experiments.<name>.run [--quick] [--seeds N] [--out DIR]

A full run writes ``results.json`` and its plot next to its ``run.py`` (unless ``--out``);
``--quick`` writes under ``runs/<name>-quick``. Trainer runs go under ``runs/<name>/``
(git-ignored), so a rerun reuses finished ones (`experiments.sweep`).
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np


def parse(name: str, argv=None, default_seeds: int = 3) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=f"python -m experiments.{name}.run")
    p.add_argument("--quick", action="store_true", help="a short smoke run (≤ 90 s)")
    p.add_argument("--seeds", type=int, default=None, help=f"seeds (default {default_seeds})")
    p.add_argument("--out", default=None, help="where results.json and the plot go")
    p.add_argument("--runs", default=None, help="trainer workdirs (default runs/<name>)")
    args = p.parse_args(argv)
    here = os.path.join(os.path.dirname(os.path.abspath(__file__)), name)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    suffix = "-quick" if args.quick else ""
    if args.out is None:
        args.out = os.path.join(root, "runs", name + suffix) if args.quick else here
    if args.runs is None:
        args.runs = os.path.join(root, "runs", name + suffix)
    if args.seeds is None:
        args.seeds = 1 if args.quick else default_seeds
    os.makedirs(args.out, exist_ok=True)
    args.start = time.time()
    return args


def mean_std(values) -> dict:
    """``{"mean", "std", "values"}`` (population std over seeds, ddof=0)."""
    v = np.asarray(values, np.float64)
    return {"mean": float(v.mean()), "std": float(v.std()), "values": [float(x) for x in v]}


def pm(stat: dict, fmt: str = ".3g") -> str:
    """``mean ± std`` for a table cell."""
    return f"{stat['mean']:{fmt}} ± {stat['std']:{fmt}}"


def write(args, results: dict) -> str:
    results = dict(results, quick=bool(args.quick), seeds=int(args.seeds),
                   seconds=round(time.time() - args.start, 1))  # fmt: skip
    path = os.path.join(args.out, "results.json")
    text = json.dumps(results, indent=1, default=_plain)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(path, "w") as f:
        f.write(text.replace(root + os.sep, "") + "\n")  # paths relative to the repository
    return path


def _plain(x):
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, np.generic):
        return x.item()
    raise TypeError(f"not JSON serialisable: {type(x)}")


def savefig(fig, path: str) -> str:
    fig.savefig(path, dpi=90, bbox_inches="tight")
    size = os.path.getsize(path)
    if size > 300_000:
        raise RuntimeError(f"{path} is {size} bytes; the plots must stay under 300 KB")
    return path
