"""Behaviour baseline of the trainer: per-step metrics and exported weights of short runs.

Recorded from the trainer as it was before the train/ redesign and compared bitwise after it
(`test_baseline.py`); re-recorded once after the changes meant to change numbers (TRL's
``eval_`` prefix, ``logits/*`` and ``scores/*`` metrics, TRL's ``rewards/*`` convention for
SimPO, ORPO, IPO, sigmoid_norm and f-DPO), with every exported weight file unchanged. It
covers every ``configs/*.py`` at ``:tiny`` (with one eval batch and an HF export),
``configs/default.py`` at a short length (SFT stage, periodic and exact task
evaluation, checkpoints), and a few data/reference modes of DPO.

  python -m tests.train.baseline record tests/train/baseline.json   # rewrite (on purpose)

Rewrite it only for a change that is meant to change numbers, and say why in the commit.
"""

import hashlib
import importlib
import json
import math
import os
import pathlib
import sys
import tempfile

REPO = pathlib.Path(__file__).resolve().parents[2]
CONFIG_DIR = REPO / "configs"
NAMES = sorted(p.stem for p in CONFIG_DIR.glob("*.py") if p.stem not in ("__init__", "common"))
VOLATILE = ("time", "steps_per_sec", "tokens_per_sec")


def _default_short(config):
    config.sft.update(dict(steps=12, batch_size=16))
    config.train.update(dict(num_steps=6, eval_every=3, eval_batches=2, task_eval_prompts=2))
    config.checkpoint.every = 2


def _dpo_cached(config):
    config.reference.mode = "cached"


def _dpo_shared_prompt(config):
    config.data.update(dict(layout="shared_prompt", row_length=128, rows=4, groups=2))


def _dpo_pairs_accum(config):
    config.data.update(dict(layout="pairs", row_length=128, rows=2, groups=2))
    config.train.grad_accum = 2


def _dpo_accum(config):
    config.train.grad_accum = 2


VARIANTS = {
    "default:short": ("default", None, _default_short),
    "dpo:cached": ("dpo", "tiny", _dpo_cached),
    "dpo:shared_prompt": ("dpo", "tiny", _dpo_shared_prompt),
    "dpo:pairs_accum": ("dpo", "tiny", _dpo_pairs_accum),
    "dpo:accum": ("dpo", "tiny", _dpo_accum),
}
CASES = [f"{n}:tiny" for n in NAMES] + list(VARIANTS)


def make_config(case: str):
    if case in VARIANTS:
        name, arg, edit = VARIANTS[case]
    else:
        name, arg, edit = case.split(":")[0], "tiny", None
    config = importlib.import_module(f"configs.{name}").get_config(arg)
    config.mesh.data = 1  # one device: sharded paths have tests of their own
    config.export.hf = True
    config.export.plot = False
    config.train.progress = False
    if edit is not None:
        edit(config)
    return config


def _clean(v):
    return v if not isinstance(v, float) or math.isfinite(v) else str(v)


def outcome(workdir: str) -> dict:
    """The metrics rows (volatile timing keys dropped) and the exported weights' SHA-256."""
    rows = []
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        for line in f:
            row = json.loads(line)
            rows.append({k: _clean(v) for k, v in row.items() if k not in VOLATILE})
    export = os.path.join(workdir, "export", "model.safetensors")
    with open(export, "rb") as f:
        weights = hashlib.sha256(f.read()).hexdigest()
    return {"metrics": rows, "weights_sha256": weights}


def run_case(case: str, train, workdir: str) -> dict:
    """Run ``case`` with ``train(config, workdir)`` (the trainer's entry point) in ``workdir``."""
    train(make_config(case), workdir)
    return outcome(workdir)


def record(path: str, train) -> None:
    out = {}
    for case in CASES:
        with tempfile.TemporaryDirectory() as tmp:
            os.environ["MIPO_JAX_CACHE"] = os.path.join(tmp, "cache")
            out[case] = run_case(case, train, os.path.join(tmp, "run"))
        print(case, out[case]["weights_sha256"][:12], flush=True)
    with open(path, "w") as f:
        json.dump(out, f, indent=1, sort_keys=True)
        f.write("\n")


if __name__ == "__main__":
    import jax

    import tests.conftest  # noqa: F401  (8 simulated devices, offline hub: as the suite runs)

    jax.config.update("jax_disable_most_optimizations", True)
    if sys.argv[1:2] != ["record"] or len(sys.argv) != 3:
        sys.exit(__doc__)
    from mipo_jax.train.stages import run as entry

    record(sys.argv[2], entry)


def compare(case: str, expected: dict, got: dict) -> list[str]:
    """Differences between a recorded and a new outcome (empty when bitwise equal).

    The SFT stage's own rows are not compared: it is a stage with its own metrics.jsonl now
    (under ``<workdir>/sft``); its result reaches the main run's rows and exported weights.
    """
    problems = []
    want = [r for r in expected["metrics"] if r["split"] != "sft"]
    have = [r for r in got["metrics"] if r["split"] != "sft"]
    if len(want) != len(have):
        problems.append(f"{case}: {len(have)} metrics rows, expected {len(want)}")
    for a, b in zip(want, have):
        for key in sorted(set(a) | set(b)):
            if a.get(key) != b.get(key):
                problems.append(
                    f"{case} step {a['step']} {a['split']} {key}: {b.get(key)!r} != {a.get(key)!r}"
                )
    if expected["weights_sha256"] != got["weights_sha256"]:
        problems.append(f"{case}: exported weights differ")
    return problems
