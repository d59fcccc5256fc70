"""metrics.jsonl after crashes: a torn last line is moved aside, readers skip it, and a run
that resumes from step s moves the rows it will write again to metrics.dropped.jsonl."""

import json

from mipo_jax.train import writer as wr


def _lines(rows) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


def _rows(path) -> list[dict]:
    return [json.loads(line) for line in open(path)]


TRAIN = [{"step": s, "split": "train", "loss": 0.5 / s} for s in range(1, 7)]
EVAL = [{"step": s, "split": "eval", "eval/loss": 0.1 * s} for s in (0, 4, 6)]
ROWS = sorted(TRAIN + EVAL, key=lambda r: (r["step"], r["split"] == "train"))
TORN = '{"step": 7, "split": "tr'


def test_torn_last_line_is_skipped_by_readers_and_moved_aside_by_the_writer(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text(_lines(ROWS) + TORN)
    assert wr.read_metrics(str(path)) == ROWS  # the plot reads this: no JSONDecodeError
    assert wr.plot(str(path), str(tmp_path / "curves.png")) is not None
    w = wr.MetricWriter(str(tmp_path), tensorboard=False, start=6, end=6)  # 6 = last step
    w.write(7, {"loss": 0.25})
    w.close()
    got = _rows(path)
    assert got[:-1] == [r for r in ROWS if not (r["split"] == "eval" and r["step"] == 6)]
    assert got[-1]["step"] == 7 and got[-1]["loss"] == 0.25
    dropped = (tmp_path / wr.DROPPED).read_text().splitlines()
    assert dropped == [json.dumps(EVAL[-1]), TORN]  # nothing is lost


def test_resume_moves_rows_after_the_restored_step(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text(_lines(ROWS))
    assert wr.rewind(str(path), 4, 10) == 3  # train 5, train 6, eval 6
    assert _rows(path) == [r for r in ROWS if r["step"] <= 4]  # eval 4 stays: not rerun
    assert wr.rewind(str(path), 4, 10) == 0  # idempotent
    assert wr.rewind(str(path), 0, 10) == 6  # a restart from 0 reruns the step-0 evaluation
    assert path.read_text() == ""
    assert [r["step"] for r in _rows(tmp_path / wr.DROPPED)] == [5, 6, 6, 0, 1, 2, 3, 4, 4]


def test_superseded_rows():
    assert wr.superseded({"step": 5, "split": "train"}, 4, 10)
    assert not wr.superseded({"step": 4, "split": "train"}, 4, 10)
    assert not wr.superseded({"step": 4, "split": "eval"}, 4, 10)  # periodic eval, not rerun
    assert wr.superseded({"step": 0, "split": "eval"}, 0, 10)  # step-0 eval, rerun
    assert wr.superseded({"step": 10, "split": "eval"}, 10, 10)  # final eval, rerun
    assert not wr.superseded({"step": 10, "split": "train"}, 10, 10)


def test_tensorboard_purges_the_steps_a_resumed_run_writes_again(tmp_path, monkeypatch):
    import tensorboardX

    made = []
    monkeypatch.setattr(tensorboardX, "SummaryWriter", lambda d, **kw: made.append(kw) or None)
    for start, end in ((4, 10), (0, 10), (10, 10)):
        wr.MetricWriter(str(tmp_path), start=start, end=end)
    # from the first step written again: after a checkpoint, the step-0 eval, the final eval
    assert [m["purge_step"] for m in made] == [5, 0, 10]


def test_rates_are_true_from_the_first_rate_and_never_inflated(monkeypatch):
    """Steps of 2 s: steady fetches give 0.5 steps/s from the first rate on (compilation of
    step 1 excluded); a fetch with no step since the last one (before a checkpoint, after the
    last step) keeps the last rate instead of counting a step in ~0 s."""
    from mipo_jax.train import loop

    now = [100.0]
    monkeypatch.setattr(loop.time, "time", lambda: now[0])
    clock = loop._Throughput()
    assert clock.update(1, 10) == {}  # the first fetch starts the clock
    now[0] += 2.0
    assert clock.update(2, 10) == {"steps_per_sec": 0.5, "tokens_per_sec": 5.0}
    now[0] += 2.0
    assert clock.update(3, 10)["steps_per_sec"] == 0.5
    now[0] += 0.01  # step 4 flushed before its checkpoint, right after step 3's fetch
    assert clock.update(4, 10, steady=False)["steps_per_sec"] == 0.5
    now[0] += 3.99  # step 5 is next fetched after step 6's dispatch, two steps later
    assert clock.update(5, 10) == {"steps_per_sec": 0.5, "tokens_per_sec": 5.0}
