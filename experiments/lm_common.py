"""Shared pieces of the tiny-LM reproductions (reward_kl_frontier, hdpo_entropy,
length_exploitation): one tiny model, one SFT reference per task, one optimiser for all.

Every reproduction trains the same 2-layer width-64 Llama-family model (0.1M parameters)
through `mipo_jax.run` via `experiments.sweep`:

1. ``sft_reference(task, out)`` fine-tunes a random model on the task (the trainer's SFT
   stage: draws from the generating distribution on the controlled tasks, the chosen answers
   on arithmetic) once, in ``<out>/sft_<task>``; its export is every run's starting policy
   and, with a live reference, its reference.
2. ``base_config(...)`` is an algorithm's config (``configs/<name>.py``) with that model, the
   task and the shared optimiser (AdamW, lr 1e-3, cosine to 0.1×, batch 32), so algorithms
   differ only in their loss.
3. The trainer's exact task evaluation (`mipo_jax.train.task_eval`) scores every completion
   of the task's finite set for ``train.task_eval_prompts`` held-out prompts before and after
   training; its numbers land in ``summary["eval_after"]["true/..."]``.

The seed of a run is ``data.seed`` (the order of the preference pairs); the SFT reference is
shared by all seeds, so the spread over seeds is the spread of preference optimisation alone.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from typing import NamedTuple

import numpy as np

MODEL = dict(
    hidden_size=64, intermediate_size=192, num_layers=2, num_heads=4, num_kv_heads=2,
    head_dim=16, max_position_embeddings=64, compute_dtype="float32",
)  # fmt: skip
SFT_STEPS = {"controlled": 300, "length_biased": 300, "arithmetic": 2000}


def parse_args(doc: str, default_out: str) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="fewer values/steps/seeds, same path")
    p.add_argument("--seeds", type=int, default=None, help="seeds per setting (default 3; 2 quick)")
    p.add_argument("--out", default=None, help=f"output folder (default {default_out})")
    p.add_argument(
        "--workdir", default=None, help="run folders (default /tmp/mipo_repro/<name>[_quick])"
    )
    p.add_argument(
        "--finished-only",
        action="store_true",
        help="train nothing: tabulate the runs of the grid that have finished",
    )
    return p.parse_args()


def enable_compile_cache() -> None:
    from mipo_jax import compile_cache

    compile_cache.enable()


class Start(NamedTuple):
    args: argparse.Namespace
    p: dict  # the grid of this run: ``quick`` or ``full``
    seeds: int
    out: str  # results.json and the PNG
    work: str  # run folders
    sft: str  # the SFT reference's export
    start: float  # time.time() at the start


def start(doc: str, here, name: str, task: str, quick: dict, full: dict) -> Start:
    """What every reproduction's ``main`` does first: parse the command line, pick the grid,
    the output and run folders (``--quick``: under ``/tmp/mipo_repro``), turn on the
    compilation cache and train (or reuse) the task's SFT reference."""
    args = parse_args(doc, str(here))
    p = quick if args.quick else full
    out = args.out or (f"/tmp/mipo_repro/{name}_out" if args.quick else str(here))
    work = args.workdir or f"/tmp/mipo_repro/{name}{'_quick' if args.quick else ''}"
    enable_compile_cache()
    t0 = time.time()
    sft = sft_reference(task, work, p["sft_steps"])
    return Start(args, p, args.seeds or p["seeds"], out, work, sft, t0)


def _common(config, task: str, steps: int) -> None:
    config.model.update(MODEL)
    config.model.init = "random"
    config.data.update(dict(source=f"embedded:{task}", max_length=32, row_length=32))
    config.batch_size = 32
    config.optim.update(dict(name="adamw", learning_rate=1e-3, warmup_steps=10,
                             schedule="cosine", end_factor=0.1, weight_decay=0.0))  # fmt: skip
    config.train.update(dict(num_steps=steps, eval_every=0, eval_batches=0, log_every=25,
                             progress=False, task_eval_prompts=4))  # fmt: skip
    config.checkpoint.every = 10**6
    config.export.update(dict(hf=False, plot=False))


def sft_reference(task: str, out: str, steps: int | None = None, seed: int = 0) -> str:
    """The task's SFT model (trained once in ``<out>/sft_<task>``, reused); its HF folder."""
    import mipo_jax
    from mipo_jax.train import stages

    config = mipo_jax.get_config("dpo")
    _common(config, task, 1)
    config.seed = seed
    config.sft.update(dict(steps=steps or SFT_STEPS[task], batch_size=64, learning_rate=3e-3,
                           warmup_steps=20))  # fmt: skip
    start = time.time()
    done = stages.sft_stage(config, os.path.join(out, f"sft_{task}"))
    print(f"SFT reference for {task}: {done['export']} ({time.time() - start:.0f} s)")
    return done["export"]


def base_config(name: str, task: str, steps: int, sft_export: str, reference: str, **args):
    """``configs/<name>.py`` (with ``args``) on ``task`` from the SFT model, shared optimiser.

    ``reference``: ``"dataset"`` (the task's exact π_ref log-probs from the data columns, the
    controlled tasks only) or ``"live"`` (the SFT model, frozen).
    """
    import mipo_jax

    config = mipo_jax.get_config(name, **args)
    _common(config, task, steps)
    config.model.init = f"hf:{sft_export}"
    config.sft.steps = 0
    config.reference.mode = reference
    return config


def sweep_runs(base, grid: list[dict], out_dir: str, finished_only: bool = False) -> list[dict]:
    """`experiments.sweep.run_grid` over ``grid``; ``finished_only``: only the finished ones."""
    from experiments import sweep

    if finished_only:
        done = lambda ov: os.path.exists(os.path.join(out_dir, sweep.run_name(ov), "summary.json"))
        grid = [ov for ov in grid if done(ov)]
    return sweep.run_grid(base, grid, out_dir)


def seeds_overrides(grid: list[dict], seeds: int) -> list[dict]:
    """Every override set of ``grid`` once per seed (``data.seed``: the pair order)."""
    return [{**g, "data.seed": s} for g in grid for s in range(seeds)]


def first_eval(runs: list[dict]) -> dict:
    """The starting policy's evaluation (the SFT model): ``eval_before`` of the first run that
    has one (a run resumed from a checkpoint after step 0 has none)."""
    return next(r["summary"]["eval_before"] for r in runs if r["summary"]["eval_before"])


def mean_std(values) -> tuple[float, float]:
    v = np.asarray(values, dtype=float)
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0


def fmt(mean: float, std: float, digits: int = 3) -> str:
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def write_json(path: str, obj) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=False)
        f.write("\n")


def run_record(r: dict, keys: list[str]) -> dict:
    """One run for results.json: its overrides, the chosen summary numbers, its config."""
    after = r["summary"]["eval_after"]
    before = r["summary"]["eval_before"] or {}  # None for a run resumed after step 0
    return dict(
        name=r["name"],
        overrides=r["overrides"],
        after={k: after[k] for k in keys if k in after},
        before={k: before[k] for k in keys if k in before},
        seconds=r["summary"].get("seconds"),
        config=r["config"],
    )


def score_folder(folder: str, config, evaluator) -> np.ndarray:
    """An exported model's renormalised log-prob table on ``evaluator``'s prompts and
    completion set (`mipo_jax.train.task_eval`), scored as the trainer scores it."""
    import functools

    import jax

    from mipo_jax.train import modules, setup
    from mipo_jax.train.scoring import Scorer, sequence_logps

    built = modules.load_folder(folder, config.model, setup.mesh_of(config), folder)
    scorer = Scorer(built.graph, chunk_size=int(config.train.logps_chunk))
    fn = jax.jit(functools.partial(sequence_logps, scorer=scorer))
    return evaluator.logprobs(lambda b: np.asarray(fn(built.params, b)))
