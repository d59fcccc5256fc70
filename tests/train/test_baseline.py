"""Every config trains, and bitwise as recorded in ``baseline.json`` (see `baseline.py`).

Configs with sections of their own (rounds, token weights, mask net, learnable prior,
TR-DPO sync, KTO, the SFT stage of ``default``) and the data/reference variants run through
the whole job (`stages.run`: stages, loop, eval, checkpoints, export): every metrics row and
the exported weights must equal the recording. Configs that differ only in their ``loss``
section share all of that machinery, so they are checked at the step: the step traces
(``jax.eval_shape``) and one real step on the tiny shapes gives the recorded step-1 metrics.
"""

import json
import math
import os
import pathlib

import jax
import pytest

from mipo_jax.train import setup, stages
from mipo_jax.train.data import to_device
from mipo_jax.train.evaluation import values
from tests.train import baseline as B

COMMON = {"algorithm", "objective", "seed", "arg", "loss", "optim", "batch_size", "model",
          "data", "mesh", "reference", "sft", "train", "checkpoint", "export"}  # fmt: skip
DERIVED = {"hdpo_beta", "gamma_beta_ratio"}  # loss-section helpers (field references)
EXPECTED = json.loads((pathlib.Path(__file__).parent / "baseline.json").read_text())


def loss_only(case: str) -> bool:
    if case in B.VARIANTS or case == "smollm2:tiny":  # another data set and tokenizer
        return False
    config = B.make_config(case)
    return config.objective == "paired" and not (set(config.keys()) - COMMON - DERIVED)


STEP_CASES = [c for c in B.CASES if loss_only(c) and c != "dpo:tiny"]
RUN_CASES = [c for c in B.CASES if c not in STEP_CASES]


@pytest.fixture(autouse=True)
def fast_compile(tmp_path, monkeypatch):
    monkeypatch.setenv("MIPO_JAX_CACHE", str(tmp_path / "cache"))
    old = jax.config.values["jax_disable_most_optimizations"]
    # JAX's in-memory caches do not key on this flag: a program that an earlier test compiled
    # with optimisations (the same config and shapes, e.g. a dpo:tiny run) would be reused and
    # round differently from the recording, which compiled everything without them. Compile
    # afresh, and leave no unoptimised program behind for later tests.
    jax.clear_caches()
    jax.config.update("jax_disable_most_optimizations", True)
    yield
    jax.config.update("jax_disable_most_optimizations", old)
    jax.clear_caches()


def test_cases_split_as_intended():
    assert {"dice:tiny", "tisdpo:tiny", "kto:tiny", "default:short", "dpo:tiny"} <= set(RUN_CASES)
    assert {"simpo:tiny", "ipo:tiny", "tdpo:tiny"} <= set(STEP_CASES)
    assert set(EXPECTED) == set(B.CASES)


@pytest.mark.parametrize("case", RUN_CASES)
def test_whole_run_equals_baseline(case, tmp_path):
    workdir = str(tmp_path / "run")
    got = B.run_case(case, stages.run, workdir)
    assert B.compare(case, EXPECTED[case], got) == []
    assert os.path.isdir(os.path.join(workdir, "checkpoints", str(got["metrics"][-1]["step"])))


@pytest.mark.parametrize("case", STEP_CASES)
def test_first_step_equals_baseline(case, tmp_path):
    run, state = setup.build(B.make_config(case), str(tmp_path))
    host = run.source.next(0, state)
    for transform in run.transforms:
        host = transform(host, state, 0)
    batch = to_device(host, run.batch_sharding)
    shapes = jax.eval_shape(run.step_fn, state, batch, run.reference)
    assert shapes[0].step.shape == () and "loss" in shapes[1]
    _, metrics = run.step_fn(state, batch, run.reference)
    got = {k: v if math.isfinite(v) else str(v) for k, v in values(metrics).items()}
    want = next(r for r in EXPECTED[case]["metrics"] if r["split"] == "train")
    want = {k: v for k, v in want.items() if k not in ("step", "split")}
    assert got == want
