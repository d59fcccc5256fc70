"""SIGTERM during training: the worker saves at the step it reached and exits 0; resuming
continues from there and ends bitwise equal to an uninterrupted run."""

import json
import queue
import signal
import threading
import time

from tests import multiprocess_worker as w

SIGNAL_AFTER = 3  # steps seen before sending SIGTERM
EXTRA = 2  # steps the resumed run adds


def _lines(proc) -> queue.Queue:
    q: queue.Queue = queue.Queue()

    def pump():
        for line in proc.stdout:
            q.put(line)
        q.put(None)

    threading.Thread(target=pump, daemon=True).start()
    return q


def _wait_for(q: queue.Queue, text: str, deadline: float, seen: list[str]) -> None:
    while True:
        line = q.get(timeout=max(0.1, deadline - time.monotonic()))
        assert line is not None, f"worker ended before {text!r}:\n{''.join(seen)[-4000:]}"
        seen.append(line)
        if text in line:
            return


def test_sigterm_saves_exits_zero_and_resume_continues(tmp_path):
    workdir = tmp_path / "run"
    args = [
        "train",
        "--mesh",
        "1,1,1",
        "--workdir",
        str(workdir),
        "--steps",
        "100000",
        "--save-every",
        "2",
        "--sleep",
        "0.05",
        "--out",
        str(tmp_path / "out.json"),
    ]
    proc = w.launch(args, devices=1)
    seen: list[str] = []
    try:
        _wait_for(_lines(proc), f"STEP {SIGNAL_AFTER} ", time.monotonic() + w.TIMEOUT_S, seen)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=w.TIMEOUT_S)
    finally:
        proc.kill()
    time.sleep(0.1)  # let the pump thread drain the pipe
    assert proc.returncode == 0, "".join(seen)[-4000:]
    out = json.loads((tmp_path / "out.json").read_text())
    stopped_at = out["end"]
    assert out["stopped"] and stopped_at >= SIGNAL_AFTER

    mesh = w.make_mesh((1, 1, 1))
    ckpt = w.make_checkpointer(workdir, save_every=2)
    assert ckpt.latest_step() == stopped_at
    resumed = w.run_training(ckpt, mesh, stopped_at + EXTRA)
    ckpt.close()
    assert (resumed["start"], resumed["end"]) == (stopped_at, stopped_at + EXTRA)

    fresh = w.make_checkpointer(tmp_path / "uninterrupted", save_every=2)
    reference = w.run_training(fresh, mesh, stopped_at + EXTRA)
    fresh.close()
    interrupted = {int(k): float.fromhex(v) for k, v in out["losses"].items()}
    assert interrupted | resumed["losses"] == reference["losses"]
    expected, actual = w.flatten(reference["state"]), w.flatten(resumed["state"])
    assert {k: v.tobytes() for k, v in actual.items()} == {
        k: v.tobytes() for k, v in expected.items()
    }
