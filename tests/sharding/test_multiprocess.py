"""Multi-process runs: 2 local processes x 2 CPU devices joined by jax.distributed (gloo) train,
checkpoint and resume with the same per-step losses as one process with 4 devices; SIGTERM to
one process stops both at the same step with a checkpoint. Plus `mipo_jax.distributed` units."""

import json
import queue
import signal
import threading
import time

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from mipo_jax import distributed
from mipo_jax.checkpoint import Checkpointer
from tests import multiprocess_worker as w

MESH = "2,1,2"  # data=2 spans the two processes; tensor=2 within each


def _train_args(workdir, steps, out):
    return [
        "train",
        "--mesh",
        MESH,
        "--workdir",
        str(workdir),
        "--steps",
        str(steps),
        "--save-every",
        "2",
        "--out",
        str(out),
    ]


def _losses(path) -> dict[int, str]:
    return {int(k): v for k, v in json.loads(path.read_text())["losses"].items()}


def test_two_processes_train_checkpoint_resume_like_one_process(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir(), two.mkdir()
    reference = w.launch(_train_args(one, 3, one / "losses.json"), devices=4)
    first = w.launch_processes(_train_args(two, 2, two / "first_{pid}.json"), 2, devices=2)
    w.finish([reference, *first])
    second = w.launch_processes(_train_args(two, 3, two / "second_{pid}.json"), 2, devices=2)
    outputs = w.finish(second)
    assert all("RESUMED 2" in out for out in outputs)

    expected = _losses(one / "losses.json")
    assert sorted(expected) == [1, 2, 3]
    for pid in (0, 1):
        got = _losses(two / f"first_{pid}.json") | _losses(two / f"second_{pid}.json")
        # Bitwise: both runs execute the same partitioned program on a (2, 1, 2) mesh; every
        # cross-device reduction has 2 operands (data or tensor axis), and a + b == b + a
        # exactly in IEEE arithmetic, so gloo vs in-process collectives cannot reorder sums.
        assert got == expected, (pid, got, expected)

    mesh = w.make_mesh((2, 2, 2))  # the checkpoints restore onto this process's 8 devices
    states = []
    for workdir in (one, two):
        with Checkpointer(workdir / "checkpoints", save_every=2) as ckpt:
            assert ckpt.all_steps() == [2, 3]
            states.append(ckpt.restore(3, w.abstract_state(mesh)))
    assert states[0].data_iter == states[1].data_iter == {"next_batch": 3}
    flat = [w.flatten(r.state) for r in states]
    assert {k: v.tobytes() for k, v in flat[0].items()} == {
        k: v.tobytes() for k, v in flat[1].items()
    }


def test_sigterm_to_one_process_stops_all_at_one_step(tmp_path):
    args = [
        "train",
        "--mesh",
        MESH,
        "--workdir",
        str(tmp_path),
        "--steps",
        "100000",
        "--save-every",
        "1000",
        "--sleep",
        "0.05",
        "--out",
        str(tmp_path / "out_{pid}.json"),
    ]
    procs = w.launch_processes(args, 2, devices=2)
    lines: queue.Queue = queue.Queue()
    for proc in procs:
        threading.Thread(
            target=lambda p=proc: [lines.put(x) for x in p.stdout], daemon=True
        ).start()
    deadline = time.monotonic() + w.TIMEOUT_S
    try:
        while "STEP 3 " not in lines.get(timeout=max(0.1, deadline - time.monotonic())):
            pass
        procs[1].send_signal(signal.SIGTERM)
        for proc in procs:
            proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        for proc in procs:
            proc.kill()
    assert [p.returncode for p in procs] == [0, 0]
    outs = [json.loads((tmp_path / f"out_{pid}.json").read_text()) for pid in (0, 1)]
    assert outs[0]["stopped"] and outs[1]["stopped"] and outs[0]["end"] == outs[1]["end"] >= 3
    with Checkpointer(tmp_path / "checkpoints", save_every=1000) as ckpt:
        assert ckpt.all_steps() == [outs[0]["end"]]


# ---- mipo_jax.distributed in this (single) process ---------------------------------------


def test_settings_come_from_arguments_then_mipo_then_jax_environment():
    env = {
        "MIPO_COORDINATOR": "h:1",
        "JAX_COORDINATOR_ADDRESS": "j:2",
        "JAX_NUM_PROCESSES": "4",
        "MIPO_PROCESS_ID": "3",
        "JAX_PROCESS_ID": "1",
    }
    assert distributed.resolve(env=env) == ("h:1", 4, 3)
    assert distributed.resolve("a:9", 2, 0, env=env) == ("a:9", 2, 0)
    assert distributed.resolve(env={}) == (None, None, None)
    with pytest.raises(ValueError, match="MIPO_NUM_PROCESSES"):
        distributed.resolve(env={"MIPO_NUM_PROCESSES": "two"})


def test_initialize_is_a_no_op_for_one_process(monkeypatch):
    for name in (
        *distributed.ENV_COORDINATOR,
        *distributed.ENV_NUM_PROCESSES,
        *distributed.ENV_PROCESS_ID,
        distributed.ENV_AUTO,
    ):
        monkeypatch.delenv(name, raising=False)
    assert distributed.initialize() is False
    assert distributed.initialize(num_processes=1) is False
    with pytest.raises(ValueError, match="missing: MIPO_PROCESS_ID"):
        distributed.initialize("127.0.0.1:1", 2)
    assert not jax.distributed.is_initialized() and distributed.is_main_process()


def test_make_global_batch_in_one_process():
    mesh = w.make_mesh((2, 2, 2))
    assert distributed.local_batch_slice(8, mesh) == slice(0, 8)
    local = {"x": np.arange(32, dtype=np.float32).reshape(8, 4), "n": np.arange(8)}
    batch = distributed.make_global_batch(local, mesh, P(("data", "fsdp")))
    assert batch["x"].shape == (8, 4) and batch["x"].sharding.spec == P(("data", "fsdp"))
    np.testing.assert_array_equal(np.asarray(batch["x"]), local["x"])
    specs = {"x": P("data"), "n": P()}
    batch = distributed.make_global_batch(local, mesh, specs)
    assert batch["n"].sharding.spec == P() and batch["x"].sharding.spec == P("data")
