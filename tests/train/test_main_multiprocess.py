"""The real program, `python -m mipo_jax.main`, as 2 processes x 2 CPU devices (jax.distributed
over gloo on 127.0.0.1): 2 train steps and a checkpoint, then a resume to 3 steps, with the
same per-step metrics and final weights as one process with 4 devices and the same global
batch; and one process with 4 devices resumes the 2-process checkpoint, again with the same
metrics. The reference log-probs come from the on-disk cache, which the 2-process run builds
(each process then holds every example's values) and the resumed runs read; the evaluations
(held-out batches and the task's exact true reward) match too.

The algorithms that sample from the policy (DICE and SPIN's rounds, the learnable prior's MI
samples) run the same way: 2 processes x 2 devices train, evaluate and export bitwise as one
process x 4; a 2-process DICE run resumed mid-round reads the round's pairs (written by
process 0) on both processes and ends as the uninterrupted run.

The runs share a persistent compilation cache (and skip most XLA optimisations) only to save
time: the second run of a program loads the executable the first one compiled.
"""

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

from tests import multiprocess_worker as w

ARGS = (
    "--config=configs/dpo.py:tiny",  # batch_size=4 pairs per step: 2 per process when split
    "--config.checkpoint.every=2",
    "--config.optim.schedule=constant",  # after warm-up: the rate does not depend on num_steps
    "--config.optim.learning_rate=1e-2",  # visible updates in 3 steps
    "--config.export.plot=False",
    "--config.export.hf=True",  # process 0 writes the gathered policy at the end
    "--config.reference.mode=cached",  # every process needs every example's log-probs
    "--config.mesh.data=2",  # across the two processes (2 x 2) ...
    "--config.mesh.tensor=2",  # ... and within each: every reduction has 2 operands
    "--config.data.split=test",  # 512 pairs: each process tokenises the whole split
    "--config.train.task_eval_prompts=1",  # exact true reward and KLs, scored on all devices
)
# Every value the step reports; host timings (time, steps_per_sec, tokens_per_sec) left out.
TIMINGS = ("time", "steps_per_sec", "tokens_per_sec")


# The algorithms that sample from the policy: as above, with the live reference they need.
SAMPLING_ARGS = (
    "--config.optim.schedule=constant",
    "--config.optim.learning_rate=1e-2",  # DICE's round-1 scores (log π_0 − log π_-1) differ
    "--config.export.plot=False",
    "--config.export.hf=True",
    "--config.mesh.data=2",
    "--config.mesh.tensor=2",
    "--config.data.split=test",
)
SAMPLING = {
    "dice": ("--config=configs/dice.py:tiny", "--config.rounds.steps_per_round=2",
             "--config.checkpoint.every=1"),  # 2 rounds x 2 steps; a checkpoint mid-round 1
    "spin": ("--config=configs/spin.py:tiny",),  # 2 rounds x 1 step
    "mipo_learned": ("--config=configs/mipo_learned.py:tiny",),  # 2 steps, MI samples
}  # fmt: skip
SAMPLING_TIMEOUT_S = 2 * w.TIMEOUT_S  # 3 processes compile sampling, scoring, step and eval


def main(workdir, steps, processes: int, devices: int, env: dict, cache, args=ARGS) -> list:
    """Start `processes` trainers (one per process of the run), output piped. ``steps`` None:
    the config's run length; ``cache`` None: no reference cache."""
    cmd = [sys.executable, "-m", "mipo_jax.main", *args, f"--workdir={workdir}"]
    if steps is not None:
        cmd.append(f"--config.train.num_steps={steps}")
    if cache is not None:
        cmd.append(f"--config.reference.cache_dir={cache}")
    port = w.free_port()

    def dist(p: int) -> dict:  # process p's multi-process settings (none for one process)
        if processes == 1:
            return {}
        n, coordinator = str(processes), f"127.0.0.1:{port}"
        return {"MIPO_COORDINATOR": coordinator, "MIPO_NUM_PROCESSES": n, "MIPO_PROCESS_ID": str(p)}

    return [
        subprocess.Popen(
            cmd,
            cwd=w.REPO,
            env=w.subprocess_env(devices, {**env, **dist(p)}),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for p in range(processes)
    ]


def metrics(workdir) -> dict:
    """{(split, step): values} from metrics.jsonl; each row must be written exactly once."""
    out = {}
    for line in open(workdir / "metrics.jsonl"):
        row = json.loads(line)
        key = (row.pop("split"), row.pop("step"))
        assert key not in out, f"{workdir}: {key} written twice (only process 0 writes)"
        out[key] = {k: v for k, v in row.items() if k not in TIMINGS}
    return out


def fast_env(tmp_path) -> dict:
    return {
        "JAX_COMPILATION_CACHE_DIR": str(tmp_path / "xla_cache"),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
        "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
        "JAX_DISABLE_MOST_OPTIMIZATIONS": "1",
        "MIPO_JAX_CACHE": str(tmp_path / "cache"),
    }


def export(workdir) -> bytes:
    return (workdir / "export" / "model.safetensors").read_bytes()


@pytest.mark.slow
def test_two_processes_train_checkpoint_resume_like_one_process(tmp_path):
    env = fast_env(tmp_path)
    one, two, back = tmp_path / "one", tmp_path / "two", tmp_path / "back"
    # reference caches: one of its own for the 1-process run; the 2-process run builds the
    # other, which its resume and the 1-process resume then read
    c1, c2 = tmp_path / "ref_one", tmp_path / "ref_two"
    first = w.finish(main(one, 3, 1, 4, env, c1) + main(two, 2, 2, 2, env, c2))
    shutil.copytree(two, back)  # the 2-process checkpoint at step 2, resumed by one process
    resumed = w.finish(main(two, 3, 2, 2, env, c2) + main(back, 3, 1, 4, env, c2))

    assert all("reference cache miss" in out for out in first)
    for out in resumed:  # both processes of the 2-process run, then the 1-process run
        assert "checkpoints/2 at step 2" in out, out[-3000:]  # "resumed from <path> at step 2"
        assert "reference cache hit" in out and "reference cache miss" not in out
    assert '"algorithm": "dpo"' in resumed[0] and '"algorithm": "dpo"' not in resumed[1]
    assert [p.name for p in c2.iterdir()] == [p.name for p in c1.iterdir()]  # one key

    weights = [(d / "export" / "model.safetensors").read_bytes() for d in (one, two, back)]
    assert weights[0] == weights[1] == weights[2]  # the final policies, bitwise

    want = metrics(one)
    assert [k for k in want if k[0] == "train"] == [("train", 1), ("train", 2), ("train", 3)]
    assert {("eval", 0), ("eval", 3)} <= set(want)
    for workdir in (two, back):
        got = metrics(workdir)
        for key in want:
            # Bitwise, not close: the runs execute the same partitioned program on a
            # (2, 1, 2) mesh over the same global batches, and every cross-device reduction
            # has 2 operands (data or tensor axis): a + b == b + a exactly, so gloo and the
            # in-process collectives agree. (On a (4, 1, 1) mesh they sum 4 operands in
            # different orders, and step 3 differed in the last bits, ~1e-7 relative.)
            assert got[key] == want[key], (workdir.name, key, got[key], want[key])


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", sorted(SAMPLING))
def test_sampling_algorithms_two_processes_like_one(algorithm, tmp_path):
    """Samples are drawn on the mesh for the global prompts and gathered to every process,
    so both processes build the same round pairs (DICE, SPIN) and MI samples, and the run
    equals one process's. DICE also resumes mid-round on both processes from round 1's file."""
    env, args = fast_env(tmp_path), SAMPLING[algorithm] + SAMPLING_ARGS  # --config first
    one, two, back = tmp_path / "one", tmp_path / "two", tmp_path / "back"
    runs = main(one, None, 1, 4, env, None, args) + main(two, None, 2, 2, env, None, args)
    outs = w.finish(runs, timeout=SAMPLING_TIMEOUT_S)
    if algorithm == "dice":  # round 1's pairs are sampled and ranked (round 0's scores tie)
        assert all("round 1: 8 pairs" in out for out in outs), outs[0][-3000:]
    if algorithm != "mipo_learned":  # the same pairs, token for token
        a, b = (np.load(d / "rounds" / "round_1.npz") for d in (one, two))
        assert sorted(a) == sorted(b) and all((a[k] == b[k]).all() for k in a)
    want = metrics(one)
    assert export(one) == export(two)
    assert metrics(two) == want
    assert {("eval", 0), ("train", 1), ("train", 2)} <= set(want)
    if algorithm != "dice":
        return
    # resume the 2-process run from its mid-round-1 checkpoint (step 3): both processes read
    # round_1.npz (none samples again) and train step 4 as the uninterrupted run did
    shutil.copytree(two, back)
    shutil.rmtree(back / "checkpoints" / "4")
    shutil.rmtree(back / "export")
    (back / "metrics.jsonl").unlink()
    outs = w.finish(main(back, None, 2, 2, env, None, args), timeout=SAMPLING_TIMEOUT_S)
    for out in outs:
        assert "checkpoints/3 at step 3" in out, out[-3000:]
        assert "round 1: 8 pairs" in out and "round 1: DICE" not in out, out[-3000:]
    assert export(back) == export(one)
    assert metrics(back) == {k: v for k, v in want.items() if k[1] == 4}
