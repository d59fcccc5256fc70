"""Fault injection: the command killed, stopped and starved of disk, then resumed.

* kill -9 at random moments inside each phase of a run that checkpoints every 2 steps
  (compiling the first step, mid-step, during an asynchronous save, during a periodic
  evaluation, the final save, the final evaluation, the export and the plot), with SIGTERM
  and SIGINT in between; each process resumes where the last one left off. The final
  ``metrics.jsonl`` (timings aside) and exported weights equal an uninterrupted run's bitwise,
  with every row once.
* SIGTERM and SIGINT in every stage (SFT, TIS-DPO's contrastive runs, DICE's rounds, the
  main run): before the first step the job stops with nothing saved; between steps it saves
  at the next step; after the last save it stops; each resumes to the end.
* a full disk during a save (a small tmpfs where mounting is permitted, else a commit that
  fails with ENOSPC): the run stops with a message naming the step and the newest complete
  checkpoint, and resumes bitwise once space returns.
* no checkpoint restores: the run refuses to start over unless ``checkpoint.restart=True``.

The subprocess runs go through `tests.train.fault_runner` (the real command plus markers and
short sleeps that widen each phase) and share a persistent compilation cache. The moments are
drawn from a seeded generator; a failure prints the seed (``MIPO_FAULT_SEED`` replays it).
"""

import json
import os
import pathlib
import queue
import random
import re
import signal
import subprocess
import sys
import threading
import time

import jax
import pytest

from configs import dice, dpo, tisdpo
from mipo_jax.checkpoint import UnusableCheckpoints, integrity
from mipo_jax.train import loop, stages
from mipo_jax.train.writer import DROPPED
from tests import multiprocess_worker as w

ARGS = (
    "--config=configs/dpo.py:tiny",
    "--config.mesh.data=1",
    "--config.data.split=test",  # 512 pairs: less to tokenise in every process
    "--config.train.num_steps=12",
    "--config.train.eval_every=4",
    "--config.checkpoint.every=2",
    "--config.export.hf=True",
    "--config.export.plot=True",
)
SLOW = {"step": 0.2, "save": 0.3, "eval": 0.2, "export": 0.2, "plot": 0.2}
VOLATILE = ("time", "steps_per_sec", "tokens_per_sec")
KILL, TERM, INT = signal.SIGKILL, signal.SIGTERM, signal.SIGINT
# (signal, marker, phase): each sent at a random moment of the marker's window; the phases
# with evidence to check (`_check_phase`) are held open by the runner until the signal comes
PLAN = [
    (KILL, "dispatch 1", "compiling the first step"),
    (TERM, "start", "start-up"),
    (KILL, "step 3", "mid-step"),
    (KILL, "save 4", "an asynchronous save"),
    (INT, "step 5", "mid-step"),
    (KILL, "step 7", "mid-step"),
    (KILL, "eval 8", "a periodic evaluation"),
    (KILL, "step 9", "mid-step"),
    (TERM, "step 10", "mid-step"),
    (KILL, "save 12", "the final save"),
    (KILL, "eval 12", "the final evaluation"),
    (KILL, "export", "the export"),
    (KILL, "plot", "the plot"),
]
WINDOW = {"start": 0.8, "step": SLOW["step"], "save": 1.0, "eval": 1.0, "export": 1.0,
          "plot": 1.0}  # fmt: skip
HELD = ("save", "eval", "export", "plot")
COMPILE_TRIES = 3  # the compile kill lands after the compilation: try again (see below)


class Runner:
    """One `fault_runner` process; its output is read line by line on a thread."""

    def __init__(self, workdir, env, faults=None, extra=()):
        self.t0 = time.monotonic()
        self.seen: dict[str, float] = {}  # marker -> seconds after start, when first seen
        cmd = [sys.executable, "-m", "tests.train.fault_runner", *ARGS, *extra]
        self.proc = subprocess.Popen(
            [*cmd, f"--workdir={workdir}"],
            cwd=w.REPO,
            env={**env, "MIPO_FAULTS": json.dumps(faults or {})},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.lines: list[str] = []
        self._q: queue.Queue = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self):
        for line in self.proc.stdout:
            if line.startswith("FAULT "):
                self.seen.setdefault(line[6:].strip(), time.monotonic() - self.t0)
            self._q.put(line)
        self._q.put(None)

    def wait_for(self, marker: str, timeout: float = w.TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout
        while True:
            line = self._q.get(timeout=max(0.1, deadline - time.monotonic()))
            assert line is not None, f"ended before {marker!r}:\n{self.output[-4000:]}"
            self.lines.append(line)
            if line.strip() == f"FAULT {marker}":
                return

    def finish(self, timeout: float = w.TIMEOUT_S) -> int:
        try:
            self.proc.wait(timeout=timeout)
        finally:
            self.proc.kill()
        while (line := self._q.get(timeout=30)) is not None:
            self.lines.append(line)
        return self.proc.returncode

    @property
    def output(self) -> str:
        return "".join(self.lines)


def env_for(tmp) -> dict:
    return w.subprocess_env(
        1,
        {
            "JAX_COMPILATION_CACHE_DIR": str(tmp / "xla_cache"),
            "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
            "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
            "JAX_DISABLE_MOST_OPTIMIZATIONS": "1",
            "MIPO_JAX_CACHE": str(tmp / "cache"),
            "HF_HUB_OFFLINE": "1",
        },
    )


def outcome(workdir) -> tuple[list[dict], bytes]:
    rows = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
    rows = [{k: v for k, v in r.items() if k not in VOLATILE} for r in rows]
    return rows, (workdir / "export" / "model.safetensors").read_bytes()


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """The uninterrupted run (the reference) and the environment every process shares."""
    tmp = tmp_path_factory.mktemp("faults")
    env = env_for(tmp)
    ref = Runner(tmp / "reference", env)  # compiles into the (empty) persistent cache
    assert ref.finish() == 0, ref.output[-4000:]
    rows, weights = outcome(tmp / "reference")
    keys = [(r["split"], r["step"]) for r in rows]
    assert len(keys) == len(set(keys)) and ("eval", 12) in keys and ("train", 12) in keys
    compile_s = ref.seen["step 1"] - ref.seen["dispatch 1"]  # the first step's compilation
    return {"tmp": tmp, "env": env, "rows": rows, "weights": weights, "compile_s": compile_s}


def seeded() -> tuple[random.Random, int]:
    seed = int(os.environ.get("MIPO_FAULT_SEED", time.time_ns() % 2**31))
    return random.Random(seed), seed


def steps(workdir) -> list[int]:
    directory = workdir / "checkpoints"
    if not directory.is_dir():
        return []
    return sorted(
        int(p.name) for p in directory.iterdir() if p.name.isdigit() and not
        integrity.step_problem(p)
    )  # fmt: skip


@pytest.mark.slow
def test_kill_stop_resume_equals_uninterrupted(shared, tmp_path):
    rng, seed = seeded()
    workdir, log = tmp_path / "run", []
    window = dict(WINDOW, dispatch=max(0.06, 0.5 * shared["compile_s"]))
    plan = list(PLAN)
    while plan:
        sig, marker, phase = plan.pop(0)
        before = steps(workdir)
        env, faults = shared["env"], dict(SLOW)
        if marker == "dispatch 1":  # no persistent cache: this process really compiles
            env = {k: v for k, v in env.items() if k != "JAX_COMPILATION_CACHE_DIR"}
            env["MIPO_JAX_COMPILE_CACHE"] = "off"  # nor the one mipo_jax.main turns on
        if marker.split()[0] in HELD:
            faults["hold"] = marker
        run = Runner(workdir, env, faults)
        run.wait_for(marker)
        delay = rng.uniform(0.05, window[marker.split()[0]])
        time.sleep(delay)
        run.proc.send_signal(sig)
        rc = run.finish()
        log.append(f"{signal.Signals(sig).name} at {marker}+{delay:.2f}s ({phase}): rc {rc}")
        context = f"seed {seed}; {log}\n{run.output[-3000:]}"
        if sig == KILL:
            assert rc == -KILL, context
        else:  # the command's clean stop: 0 after SIGTERM, 130 after SIGINT, no traceback
            assert rc == (130 if sig == INT else 0), context
            assert "Traceback" not in run.output, context
        if marker == "dispatch 1" and "step 1" in run.seen:
            # the compilation was faster than the reference's (a machine less loaded now):
            # that was a mid-step kill; from step 0 again, the next process compiles again
            assert len(log) < COMPILE_TRIES and not steps(workdir), context
            log[-1] += " after the compilation"
            plan.insert(0, (sig, marker, phase))
            continue
        _check_phase(marker, workdir, run, before, context)
        if marker == "export":  # a crash mid-write of a metrics row: a torn last line
            with open(workdir / "metrics.jsonl", "a") as f:
                f.write('{"step": 12, "split": "tra')
    print(f"seed {seed}", *log, sep="\n")  # shown with -s, or with a failure
    last = Runner(workdir, shared["env"])
    assert last.finish() == 0, f"seed {seed}; {log}\n{last.output[-3000:]}"
    rows, weights = outcome(workdir)
    assert rows == shared["rows"], f"seed {seed}; {log}"  # each row once, values bitwise
    assert weights == shared["weights"], f"seed {seed}; {log}"
    dropped = (workdir / DROPPED).read_text()
    assert '{"step": 12, "split": "tra\n' in dropped  # kept aside, not lost
    assert (workdir / "curves.png").exists()
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["steps"] == 12 and summary["skipped_steps"] == 0


def _check_phase(marker: str, workdir, run: Runner, before: list[int], context: str) -> None:
    """Evidence that the signal landed inside the phase the marker opened."""
    rows = {(r["split"], r["step"]) for r in map(json.loads, open(workdir / "metrics.jsonl"))}
    tmp = lambda step: list((workdir / "checkpoints").glob(f"{step}.orbax-checkpoint-tmp*"))
    if marker == "dispatch 1":  # the first step had not returned from compiling
        assert ("train", 1) not in rows, context
    elif marker == "start":  # before training: nothing new saved
        assert steps(workdir) == before and "dispatch 1" not in run.seen, context
    elif marker.startswith("save"):  # only orbax's temporary directory of the step
        assert tmp(marker.split()[1]) and int(marker.split()[1]) not in steps(workdir), context
    elif marker.startswith("eval"):  # the evaluation had not returned
        assert ("eval", int(marker.split()[1])) not in rows, context
    elif marker == "export":  # no weights file yet
        assert not (workdir / "export" / "model.safetensors").exists(), context
    elif marker == "plot":  # the last thing before the summary
        assert not (workdir / "curves.png").exists(), context
        assert not (workdir / "summary.json").exists(), context


def _tmpfs_works(directory) -> bool:
    if os.environ.get("MIPO_FAULT_NO_TMPFS"):  # to run the other branch where mounting works
        return False
    probe = directory / "probe"
    probe.mkdir()
    cmd = ["unshare", "-rm", "sh", "-c", f"mount -t tmpfs -o size=64k tmpfs {probe}"]
    try:
        return subprocess.run(cmd, capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@pytest.mark.slow
def test_full_disk_during_a_save_then_resume(shared, tmp_path):
    workdir = tmp_path / "run"
    (workdir / "checkpoints").mkdir(parents=True)
    one = shared["tmp"] / "reference" / "checkpoints" / "12"
    pages = sum(-(-p.stat().st_size // 4096) for p in one.rglob("*") if p.is_file())
    size_kb = 4 * pages  # what one checkpoint takes on a tmpfs (a page per file at least)
    if _tmpfs_works(tmp_path):  # room for two checkpoints: the third save fills the disk
        out1, out2 = tmp_path / "out1", tmp_path / "out2"
        script = (
            f'mount -t tmpfs -o size={int(2.5 * size_kb)}k tmpfs "$CK" || exit 3; '
            '"$@" > "$OUT1" 2>&1; echo $? > "$OUT1.rc"; '
            'mount -o remount,size=64m "$CK" || exit 4; '  # space returns
            '"$@" > "$OUT2" 2>&1; echo $? > "$OUT2.rc"'
        )
        env = {**shared["env"], "OUT1": str(out1), "OUT2": str(out2), "MIPO_FAULTS": "{}",
               "CK": str(workdir / "checkpoints")}  # fmt: skip
        cmd = [sys.executable, "-m", "tests.train.fault_runner", *ARGS, f"--workdir={workdir}"]
        subprocess.run(["unshare", "-rm", "sh", "-c", script, "sh", *cmd], cwd=w.REPO,
                       env=env, timeout=2 * w.TIMEOUT_S, check=True)  # fmt: skip
        rc1, text1 = int((tmp_path / "out1.rc").read_text()), out1.read_text()
        rc2, text2 = int((tmp_path / "out2.rc").read_text()), out2.read_text()
    else:  # no mount permission: the commit of step 6 fails with ENOSPC instead
        first = Runner(workdir, shared["env"], {"enospc": 6})
        rc1, text1 = first.finish(), first.output
        second = Runner(workdir, shared["env"])
        rc2, text2 = second.finish(), second.output
    assert rc1 == 1, text1[-3000:]
    failed = re.search(r"saving the checkpoint of step (\d+) .* failed: the disk is full", text1)
    newest = re.search(r"Newest complete checkpoint: step (\d+)", text1)
    assert failed and newest, text1[-3000:]
    assert int(newest.group(1)) == int(failed.group(1)) - 2 >= 2  # saves every 2 steps
    assert rc2 == 0, text2[-3000:]
    assert f"at step {newest.group(1)}" in text2  # "resumed from .../checkpoints/N at step N"
    rows, weights = outcome(workdir)
    assert rows == shared["rows"] and weights == shared["weights"]


# ---- in-process: SIGTERM and SIGINT in every stage -----------------------------------------


@pytest.fixture
def fast(tmp_path, monkeypatch):
    monkeypatch.setenv("MIPO_JAX_CACHE", str(tmp_path / "cache"))
    old = jax.config.values["jax_disable_most_optimizations"]
    jax.config.update("jax_disable_most_optimizations", True)
    yield
    jax.config.update("jax_disable_most_optimizations", old)


class _Source:
    """A batch source that sends a signal while the host prepares step ``at`` (0-based)."""

    def __init__(self, source, signum, at):
        self.source, self.signum, self.at = source, signum, at

    def next(self, step, state):
        if step == self.at:
            os.kill(os.getpid(), self.signum)
        return self.source.next(step, state)

    def get_state(self):
        return self.source.get_state()

    def set_state(self, s):
        self.source.set_state(s)


class _Evaluator:
    """An evaluator that sends a signal as the final evaluation (after step ``end``) starts."""

    def __init__(self, evaluator, signum, end):
        self.evaluator, self.signum, self.end = evaluator, signum, end
        self.enabled = evaluator.enabled

    def __call__(self, state):
        if int(state.step) == self.end:
            os.kill(os.getpid(), self.signum)
        return self.evaluator(state)


def signal_in(monkeypatch, run_dir: str, signum, when) -> None:
    """Send ``signum`` in the run whose workdir ends with ``run_dir``: when it starts
    (``"start-up"``), while the host prepares step ``when`` (an int), or ``"final"``."""
    import dataclasses

    build = loop.build

    def patched(config, workdir, **kwargs):
        mine = workdir.endswith(run_dir)
        if mine and when == "start-up":
            os.kill(os.getpid(), signum)
        run, state = build(config, workdir, **kwargs)
        if mine and isinstance(when, int):
            run = dataclasses.replace(run, source=_Source(run.source, signum, when))
        if mine and when == "final":
            evaluator = _Evaluator(run.evaluator, signum, run.num_steps)
            run = dataclasses.replace(run, evaluator=evaluator)
        return run, state

    monkeypatch.setattr(loop, "build", patched)


def stop(monkeypatch, config, workdir, run_dir, signum, when) -> dict:
    """The job's summary after ``signum``: returned after SIGTERM; after SIGINT, attached to
    the KeyboardInterrupt the job raises once it has saved."""
    signal_in(monkeypatch, run_dir, signum, when)
    before = {s: signal.getsignal(s) for s in (TERM, INT)}
    if signum == INT:
        with pytest.raises(KeyboardInterrupt) as interrupt:
            stages.run(config, str(workdir))
        summary = interrupt.value.summary
    else:
        summary = stages.run(config, str(workdir))
    monkeypatch.undo()
    assert {s: signal.getsignal(s) for s in before} == before  # handlers restored
    return summary


def once(workdir) -> list[tuple[str, int]]:
    keys = [(r["split"], r["step"]) for r in map(json.loads, open(workdir / "metrics.jsonl"))]
    assert len(keys) == len(set(keys)), keys
    return keys


def tiny(module, **train):
    config = module.get_config("tiny")
    config.mesh.data = 1
    config.export.plot = False
    config.train.update(train)
    return config


@pytest.mark.slow
def test_sigterm_and_sigint_in_the_sft_stage(tmp_path, monkeypatch, fast):
    config = tiny(dpo)
    config.sft.update(dict(steps=4, batch_size=4))
    sft = tmp_path / "sft"
    got = stop(monkeypatch, config, tmp_path, "/sft", TERM, "start-up")
    assert got == {"stopped": "preempted", "stage": "sft", "step": None}
    assert not (sft / "checkpoints").exists() or not steps(tmp_path / "sft")
    got = stop(monkeypatch, config, tmp_path, "/sft", INT, 1)  # while preparing step 2
    assert got == {"stopped": "interrupted", "step": 2, "stage": "sft"}
    assert steps(sft) == [2]
    done = stages.run(config, str(tmp_path))
    assert done["stages"]["sft"]["workdir"] == str(sft) and done["steps"] == 2
    assert [k for k in once(sft) if k[0] == "train"] == [("train", s) for s in (1, 2, 3, 4)]


@pytest.mark.slow
def test_sigterm_and_sigint_in_the_contrastive_runs(tmp_path, monkeypatch, fast):
    config = tiny(tisdpo)
    config.token_weights.cache_dir = str(tmp_path / "tw")
    got = stop(monkeypatch, config, tmp_path, "/positive", TERM, 1)
    assert got == {"stopped": "preempted", "step": 2, "stage": "tisdpo-positive"}
    got = stop(monkeypatch, config, tmp_path, "/negative", INT, "start-up")
    assert got == {"stopped": "interrupted", "stage": "tisdpo-negative", "step": None}
    done = stages.run(config, str(tmp_path))
    assert done["steps"] == 2 and done["stages"]["tisdpo"]["trained"] == ["negative"]
    positive = pathlib.Path(done["stages"]["tisdpo"]["folders"][0]).parent
    assert once(tmp_path) and [k for k in once(positive) if k[0] == "train"] == [
        ("train", 1),
        ("train", 2),
    ]


@pytest.mark.slow
def test_sigterm_and_sigint_in_the_rounds(tmp_path, monkeypatch, fast):
    config = tiny(dice)
    config.rounds.update(dict(num_rounds=2, steps_per_round=2))
    got = stop(monkeypatch, config, tmp_path, str(tmp_path), INT, "start-up")
    assert got == {"stopped": "interrupted", "stage": "main", "step": None}
    assert not steps(tmp_path)
    got = stop(monkeypatch, config, tmp_path, str(tmp_path), TERM, 2)  # round 2 starts: sampling
    assert got == {"stopped": "preempted", "step": 3, "stage": "main"}
    assert steps(tmp_path) == [3]
    done = stages.run(config, str(tmp_path))
    assert done["steps"] == 4
    assert [k for k in once(tmp_path) if k[0] == "train"] == [("train", s) for s in range(1, 5)]


@pytest.mark.slow
def test_sigterm_and_sigint_in_the_main_run(tmp_path, monkeypatch, fast):
    config = tiny(dpo, num_steps=4)
    config.export.hf = True
    got = stop(monkeypatch, config, tmp_path, str(tmp_path), INT, 1)
    assert got == {"stopped": "interrupted", "step": 2, "stage": "main"}
    got = stop(monkeypatch, config, tmp_path, str(tmp_path), TERM, "final")  # after the last save
    assert got == {"stopped": "preempted", "stage": "main", "step": None}
    assert steps(tmp_path) == [2, 4] and not (tmp_path / "summary.json").exists()
    done = stages.run(config, str(tmp_path))
    assert done["steps"] == 4 and (tmp_path / "summary.json").exists()
    assert once(tmp_path) == [("eval", 0), ("train", 1), ("train", 2), ("train", 3),
                              ("train", 4), ("eval", 4)]  # fmt: skip


def test_no_restorable_checkpoint_refuses_to_start_over(tmp_path, fast):
    config = tiny(dpo, num_steps=2, eval_batches=0)
    config.checkpoint.every = 1
    loop.train(config, str(tmp_path))
    for step in (1, 2):
        (tmp_path / "checkpoints" / str(step) / integrity.COMMIT_MARKER).unlink()
    with pytest.raises(UnusableCheckpoints, match="holds 2 checkpoint.*checkpoint.restart=True"):
        loop.train(config, str(tmp_path))
    config.checkpoint.restart = True
    assert loop.train(config, str(tmp_path))["steps"] == 2
    names = sorted(os.listdir(tmp_path / "checkpoints"))
    assert names == ["1", "1.corrupt", "2", "2.corrupt"]
    assert once(tmp_path) == [("train", 1), ("train", 2)]
