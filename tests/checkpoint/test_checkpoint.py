"""Checkpointer in one process on the 8 simulated devices: cadence, keep-K, round trips,
corrupt-latest fallback, resume order, preemption flag."""

import errno
import logging
import os
import signal
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from mipo_jax.checkpoint import (
    Checkpointer,
    PreemptionGuard,
    UnusableCheckpoints,
    codec,
    integrity,
    restore_path,
)
from mipo_jax.errors import UserError
from tests import multiprocess_worker as w

MESH_SHAPE = (2, 2, 2)


@pytest.fixture(scope="module")
def mesh():
    return w.make_mesh(MESH_SHAPE)


@pytest.fixture(scope="module")
def step_fn(mesh):
    return w.jit_step(mesh)


def fresh_state(mesh, seed=0):
    return jax.jit(lambda: w.init_state(seed), out_shardings=w.state_shardings(mesh))()


def same_bits(a, b) -> bool:
    fa, fb = w.flatten(a), w.flatten(b)
    return fa.keys() == fb.keys() and all(
        fa[k].dtype == fb[k].dtype and fa[k].tobytes() == fb[k].tobytes() for k in fa
    )


def test_saves_every_n_keeps_k_and_survives_donation(tmp_path, mesh, step_fn):
    ckpt = Checkpointer(tmp_path, save_every=2, keep=2)
    state, data, snapshots = fresh_state(mesh), w.Data(), {}
    for step in range(1, 8):
        state, _ = step_fn(state, data.next_global(mesh))
        snapshots[step] = w.flatten(state)
        saved = ckpt.save(step, state, data_iter=data.get_state())
        assert saved == (step % 2 == 0)
        # The next step donates `state` while the asynchronous write may still be running.
    assert ckpt.save(7, state, data_iter=data.get_state(), force=True)
    assert not ckpt.save(7, state, force=True)  # already saved: skipped
    ckpt.wait_until_finished()
    assert ckpt.all_steps() == [6, 7]
    for step in (6, 7):
        restored = ckpt.restore(step, w.abstract_state(mesh))
        assert restored.data_iter == {"next_batch": step}
        assert {k: v.tobytes() for k, v in w.flatten(restored.state).items()} == {
            k: v.tobytes() for k, v in snapshots[step].items()
        }
    ckpt.close()


class WithRngs(nnx.Module):
    def __init__(self, rngs):
        self.lin = nnx.Linear(4, 8, rngs=rngs)
        self.drop = nnx.Dropout(0.5, rngs=rngs)  # holds an RngStream: a typed key + count


def test_round_trip_of_keys_config_iterator_and_metadata(tmp_path, mesh):
    keys = jax.random.split(jax.random.key(7, impl="rbg"), 8)
    state = {
        "model": nnx.state(WithRngs(nnx.Rngs(3))),
        "key": jax.random.key(5),
        "keys": jax.device_put(keys, NamedSharding(mesh, P(("data", "fsdp", "tensor")))),
        "step": jnp.asarray(11, jnp.int32),
        "bf16": jnp.linspace(-1, 1, 16, dtype=jnp.bfloat16).reshape(4, 4),
    }
    state = jax.device_put(state, NamedSharding(mesh, P()))
    state["keys"] = jax.device_put(keys, NamedSharding(mesh, P(("data", "fsdp", "tensor"))))
    config = ml_collections.ConfigDict(
        {"model": {"name": "tiny", "dims": (4, 8)}, "lr": 3e-4, "use_x": True, "path": None}
    )
    data_iter = {"epoch": 2, "index": 17, "order": [3, 1, 2], "name": "train"}
    metadata = {"reference": {"source": "hf:org/model", "revision": "abc123"}}
    with Checkpointer(tmp_path, save_every=10, config=config, metadata=metadata) as ckpt:
        ckpt.save(11, state, data_iter=data_iter, force=True, wait=True)
        restored = ckpt.restore_or_none(state)  # concrete arrays as target: their shardings
    assert restored.step == 11 and restored.source == "workdir"
    assert restored.path == str(Path(tmp_path).absolute() / "11")
    assert restored.data_iter == data_iter and restored.metadata == metadata
    assert restored.config.to_dict() == {
        **config.to_dict(),
        "model": {"name": "tiny", "dims": [4, 8]},
    }
    assert same_bits(restored.state, state)
    for path, a, b in zip(
        *zip(*jax.tree_util.tree_flatten_with_path(state)[0]),
        jax.tree.leaves(restored.state),
        strict=True,
    ):
        assert a.dtype == b.dtype, path
        assert b.sharding.is_equivalent_to(a.sharding, a.ndim), path
    assert str(jax.random.key_impl(restored.state["keys"])) == "rbg"
    # Stored on disk as plain key data, with the implementation in the metadata.
    meta = codec.key_impls(state)
    assert meta == {
        "['key']": "threefry2x32",
        "['keys']": "rbg",
        "['model']['drop']['rngs']['key'].value": "threefry2x32",
    }


def save_steps(directory, mesh, steps, step_fn):
    """Synchronous checkpoints at `steps` of one training run; returns their flattened states."""
    ckpt = Checkpointer(directory, save_every=1, keep=10, async_save=False)
    state, data, snapshots = fresh_state(mesh), w.Data(), {}
    for step in range(1, max(steps) + 1):
        state, _ = step_fn(state, data.next_global(mesh))
        if step in steps:
            ckpt.save(step, state, data_iter=data.get_state(), force=True)
            snapshots[step] = w.flatten(state)
    ckpt.close()
    return snapshots


def _truncate_arrays(step_dir: Path):
    files = [p for p in (step_dir / "state").rglob("*") if p.is_file() and p.parent.name == "d"]
    assert files
    for f in files:
        os.truncate(f, f.stat().st_size // 2)


CORRUPTIONS = {
    "no_commit_marker": lambda d: (d / integrity.COMMIT_MARKER).unlink(),
    "truncated_array_file": _truncate_arrays,
    "unreadable_state_metadata": lambda d: (d / "state" / "_METADATA").write_text('{"tree": '),
    "unreadable_step_metadata": lambda d: (d / integrity.STEP_METADATA).write_bytes(b"\x00\xff"),
    "missing_item": lambda d: __import__("shutil").rmtree(d / "data_iter"),
}


# A failed tensorstore read leaves orbax's asyncio loop a late callback ("Event loop is
# closed"); pytest reports it as unraisable. It is orbax-internal noise after a handled error.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("corruption", sorted(CORRUPTIONS))
def test_corrupt_latest_is_reported_and_previous_used(tmp_path, mesh, step_fn, caplog, corruption):
    snapshots = save_steps(tmp_path, mesh, (1, 2, 3), step_fn)
    CORRUPTIONS[corruption](tmp_path / "3")
    ckpt = Checkpointer(tmp_path, save_every=1)
    with caplog.at_level(logging.WARNING, logger="mipo_jax.checkpoint"):
        restored = ckpt.restore_or_none(w.abstract_state(mesh))
    assert restored.step == 2 and restored.data_iter == {"next_batch": 2}
    assert {k: v.tobytes() for k, v in w.flatten(restored.state).items()} == {
        k: v.tobytes() for k, v in snapshots[2].items()
    }
    warning = next(
        r.getMessage() for r in caplog.records if "incomplete or corrupt" in r.getMessage()
    )
    assert "step 3" in warning and str(tmp_path / "3") in warning
    # Moved aside, so the resumed run can write step 3 again.
    assert (tmp_path / "3.corrupt").is_dir() and ckpt.all_steps() == [1, 2]
    assert ckpt.save(3, restored.state, data_iter={"next_batch": 3}, force=True, wait=True)
    assert ckpt.restore_or_none(w.abstract_state(mesh)).step == 3
    ckpt.close()


def test_only_an_unfinished_save_means_a_fresh_start(tmp_path, mesh, caplog):
    (tmp_path / "2.orbax-checkpoint-tmp-123").mkdir()  # what a save killed midway leaves
    with caplog.at_level(logging.WARNING, logger="mipo_jax.checkpoint"):
        assert Checkpointer(tmp_path, save_every=1).restore_or_none(w.abstract_state(mesh)) is None
    assert "2.orbax-checkpoint-tmp-123" in caplog.text


def test_no_usable_checkpoint_refuses_to_start_over_unless_told(tmp_path, mesh, step_fn, caplog):
    save_steps(tmp_path, mesh, (1, 2), step_fn)
    for step in (1, 2):
        (tmp_path / str(step) / integrity.COMMIT_MARKER).unlink()
    with pytest.raises(UnusableCheckpoints) as err:
        Checkpointer(tmp_path, save_every=1).restore_or_none(w.abstract_state(mesh))
    message = str(err.value)
    assert "holds 2 checkpoint(s) and none restores" in message
    assert "step 2: no commit marker" in message and "step 1: no commit marker" in message
    assert "--config.checkpoint.restart=True" in message
    assert isinstance(err.value, UserError)  # the command: a short message, exit code 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["1", "2"]  # nothing moved
    with caplog.at_level(logging.WARNING, logger="mipo_jax.checkpoint"):
        restarted = Checkpointer(tmp_path, save_every=1, restart=True)
        assert restarted.restore_or_none(w.abstract_state(mesh)) is None
    assert "checkpoint.restart=True" in caplog.text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["1.corrupt", "2.corrupt"]
    restarted.close()


def test_incompatible_target_raises_instead_of_starting_over(tmp_path, mesh, step_fn):
    save_steps(tmp_path, mesh, (1, 2), step_fn)
    other = {"w": jax.ShapeDtypeStruct((3,), jnp.float32, sharding=NamedSharding(mesh, P()))}
    with pytest.raises(UnusableCheckpoints, match="none restores .* use a new workdir"):
        Checkpointer(tmp_path, save_every=1).restore_or_none(other)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["1", "2"]  # nothing moved aside


def test_resume_order_workdir_then_init_path(tmp_path, mesh, step_fn):
    init_dir, workdir = tmp_path / "init", tmp_path / "work"
    snapshots = save_steps(init_dir, mesh, (2, 4), step_fn)
    abstract = w.abstract_state(mesh)
    ckpt = Checkpointer(workdir, save_every=1)
    assert ckpt.restore_or_none(abstract) is None
    from_init = ckpt.restore_or_none(abstract, init_path=init_dir)
    assert (from_init.source, from_init.step) == ("init", 4)
    assert restore_path(init_dir / "2", abstract).step == 2  # one step directory
    assert {k: v.tobytes() for k, v in w.flatten(from_init.state).items()} == {
        k: v.tobytes() for k, v in snapshots[4].items()
    }
    ckpt.save(5, from_init.state, data_iter={"next_batch": 5}, force=True, wait=True)
    resumed = ckpt.restore_or_none(abstract, init_path=init_dir)
    assert (resumed.source, resumed.step) == ("workdir", 5)
    with pytest.raises(FileNotFoundError):
        restore_path(tmp_path / "missing", abstract)
    ckpt.close()


def test_as_abstract_requires_shardings():
    with pytest.raises(ValueError, match="sharding"):
        codec.as_abstract({"w": jax.ShapeDtypeStruct((2,), jnp.float32)})


@pytest.mark.parametrize(
    "signum, reason", [(signal.SIGTERM, "preempted"), (signal.SIGINT, "interrupted")]
)
def test_preemption_guard_turns_sigterm_and_sigint_into_a_flag(signum, reason):
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    with PreemptionGuard() as guard:
        assert not guard.should_stop(1) and not guard.requested
        os.kill(os.getpid(), signum)
        assert guard.should_stop(2) and guard.signal_number == signum
        assert guard.requested and guard.reason == reason
        os.kill(os.getpid(), signal.SIGTERM)  # a second signal while stopping: ignored
        assert guard.signal_number == signum
    assert {s: signal.getsignal(s) for s in before} == before


def test_failed_save_names_the_step_and_what_resumes(tmp_path, mesh, step_fn, monkeypatch):
    from orbax.checkpoint._src.path import atomicity

    from mipo_jax.checkpoint import CheckpointSaveError

    async def full_disk(self):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self.get()))

    ckpt = Checkpointer(tmp_path, save_every=1, keep=5)
    state, data = fresh_state(mesh), w.Data()
    state, _ = step_fn(state, data.next_global(mesh))
    assert ckpt.save(1, state, data_iter=data.get_state(), wait=True)
    monkeypatch.setattr(atomicity.AtomicRenameTemporaryPath, "finalize", full_disk)
    state, _ = step_fn(state, data.next_global(mesh))
    ckpt.save(2, state, data_iter=data.get_state())  # asynchronous: fails in the background
    with pytest.raises(CheckpointSaveError) as err:
        ckpt.wait_until_finished()
    message = str(err.value)
    assert "checkpoint of step 2" in message and "the disk is full" in message
    assert "Newest complete checkpoint: step 1" in message
    ckpt.close()
    monkeypatch.undo()  # space is back: a new run resumes from step 1 and saves step 2
    again = Checkpointer(tmp_path, save_every=1, keep=5)
    restored = again.restore_or_none(w.abstract_state(mesh))
    assert restored.step == 1 and restored.data_iter == {"next_batch": 1}
    assert again.save(2, state, data_iter=data.get_state(), wait=True)
    assert again.complete_steps() == [1, 2]
    again.close()
