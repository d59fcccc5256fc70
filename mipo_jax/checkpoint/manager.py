"""`Checkpointer`: a thin wrapper over orbax `CheckpointManager` for the training loop.

Each checkpoint step holds four items (orbax `args.Composite`):

  state      the train-state pytree (`StandardSave`): parameters, optimiser state, step,
             RNG, whatever the state holds; typed PRNG keys are stored as key data.
  data_iter  the data iterator's JSON-able state (`JsonSave`).
  config     the run's ConfigDict as JSON (`JsonSave`).
  meta       PRNG key implementations, device/process counts and the caller's `metadata`,
             e.g. where the reference model came from (the reference is never saved).

Saves are asynchronous: `save` returns once arrays are copied off the devices (so the next
step may donate the state) and files are written in the background. One is made every
`save_every` steps (plus whenever `force=True`, e.g. at the end or on preemption); the last
`keep` are kept.

Resume: `restore_or_none(abstract_state, init_path=...)` tries the newest workdir checkpoint,
then older ones, then `init_path`; it returns None when there is nothing to resume. The
target is a `jax.eval_shape` pytree whose leaves carry the *current* mesh's shardings, so a
checkpoint written on one mesh restores onto another (8 devices -> 4 -> 1) with identical
values. A newest checkpoint that is incomplete or unreadable is reported with a warning naming
its step and path, moved aside, and the previous one is used. When checkpoints exist and none
of them restores, it refuses to start over (`UnusableCheckpoints`, listing what was found)
unless the Checkpointer was made with ``restart=True``: then they are moved aside and the run
starts from step 0. (A save killed midway leaves only orbax's temporary directory, which is
ignored: a step directory appears only when its save is complete.)

A save that fails (a full disk, a lost mount) raises `CheckpointSaveError` from the next
`save`, `wait_until_finished` or `close`, naming the step and the newest complete checkpoint.

All processes of a multi-process run call every method with the same arguments; orbax
writes each array shard from the process that holds it and the JSON items from process 0,
so `data_iter` must be the same on every process (e.g. a position in the global order).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from etils.epath import Path
from jax.experimental import multihost_utils

from mipo_jax import paths
from mipo_jax.checkpoint import codec, integrity
from mipo_jax.distributed import all_agree
from mipo_jax.errors import UserError

logger = logging.getLogger("mipo_jax.checkpoint")


@dataclasses.dataclass(frozen=True)
class Restored:
    """A restored checkpoint. `source` is "workdir" or "init" (from `init_path`)."""

    step: int
    state: Any
    data_iter: Any
    config: ml_collections.ConfigDict | None
    metadata: dict
    source: str
    path: str


class UnusableCheckpoints(UserError):
    """Checkpoints exist and none restores: not silently starting over."""


class CheckpointSaveError(RuntimeError):
    """A checkpoint could not be written (e.g. the disk is full)."""


def _dir(directory) -> Path:
    """A checkpoint directory as an `etils.epath.Path` (what orbax takes): local ones
    absolute, object-store URLs (``gs://``) as given."""
    if paths.is_remote(directory):
        return paths.path(paths.resolve(directory))
    return paths.path(directory).absolute()


def _barrier(name: str) -> None:
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


class Checkpointer:
    """Saves and restores train state, data-iterator state and config under `directory`."""

    def __init__(
        self,
        directory: str | Path,
        *,
        save_every: int,
        keep: int = 3,
        async_save: bool = True,
        config=None,
        metadata: dict | None = None,
        restart: bool = False,
    ):
        if save_every < 1 or keep < 1:
            raise ValueError(f"save_every={save_every} and keep={keep} must be >= 1")
        self.directory = _dir(directory)
        self.save_every = save_every
        self.config = config
        self.metadata = dict(metadata or {})
        self.restart = restart
        self._saving: int | None = None  # the step of the last save (maybe still writing)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, enable_async_checkpointing=async_save, create=True
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    # ---- saving -------------------------------------------------------------------------

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def should_save(self, step: int) -> bool:
        """A periodic save is due: `step` is a multiple of `save_every` and not yet saved."""
        latest = self.latest_step()
        return step % self.save_every == 0 and (latest is None or step > latest)

    def save(self, step: int, state, *, data_iter=None, force: bool = False, wait: bool = False):
        """Save `state` (after `step` updates) when due or forced; returns whether it saved.

        Asynchronous unless `wait=True` (use that on preemption, before exiting). A step that
        is already saved is skipped.
        """
        if not (force or self.should_save(step)) or step in self._manager.all_steps():
            if wait:
                self.wait_until_finished()
            return False
        if jax.process_count() > 1:
            digest = hashlib.sha256(json.dumps(data_iter, sort_keys=True).encode()).digest()
            multihost_utils.assert_equal(
                np.frombuffer(digest[:16], np.uint8),
                "data_iter state differs between processes; it must be global",
            )
        meta = {
            "prng_keys": codec.key_impls(state),
            "process_count": jax.process_count(),
            "device_count": jax.device_count(),
            "run": self.metadata,
        }
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(codec.keys_to_data(state)),
            data_iter=ocp.args.JsonSave({"data_iter": data_iter}),
            config=ocp.args.JsonSave({"config": codec.config_to_json(self.config)}),
            meta=ocp.args.JsonSave(meta),
        )
        self._checked(self._manager.save, step, args=args, force=True)
        self._saving = step
        if wait:
            self.wait_until_finished()
        return True

    def wait_until_finished(self) -> None:
        self._checked(self._manager.wait_until_finished)

    def close(self) -> None:
        """Finish pending saves and release orbax's threads."""
        self._checked(self._manager.close)

    def __enter__(self):
        return self

    def __exit__(self, kind, *exc):
        try:
            self.close()
        except CheckpointSaveError:
            if kind is None:
                raise
            logger.exception("while stopping on an error, a checkpoint save failed too")

    def complete_steps(self) -> list[int]:
        """Steps on disk whose checkpoint is complete (cheap checks, no restore)."""
        steps = [int(p.name) for p in self.directory.iterdir() if p.name.isdigit()]
        return sorted(s for s in steps if integrity.step_problem(self.directory / str(s)) is None)

    def _checked(self, fn, *args, **kwargs):
        """Call orbax; an error of a (possibly earlier, asynchronous) save becomes a
        `CheckpointSaveError` saying which step failed and what the run can resume from."""
        try:
            return fn(*args, **kwargs)
        except Exception as e:
            step = self._saving if self._saving is not None else args[0] if args else "?"
            cause = f"{type(e).__name__}: {str(e)[:1000]}"
            if "No space left on device" in str(e) or getattr(e, "errno", None) == 28:
                cause = f"the disk is full ({cause})"
            done = self.complete_steps() if self.directory.is_dir() else []
            newest = f"step {done[-1]}" if done else "none yet"
            raise CheckpointSaveError(
                f"saving the checkpoint of step {step} in {self.directory} failed: {cause}. "
                f"Newest complete checkpoint: {newest}. Free space (or fix the cause) and run "
                "the same command again: it resumes from the newest complete checkpoint."
            ) from e

    # ---- restoring ----------------------------------------------------------------------

    def restore(self, step: int, abstract_state) -> Restored:
        """Restore `step` from this directory onto the shardings of `abstract_state`."""
        return _restore_step(self._manager, step, codec.as_abstract(abstract_state), "workdir")

    def restore_or_none(self, abstract_state, *, init_path: str | Path | None = None):
        """Newest usable workdir checkpoint, else `init_path`'s newest, else None.

        Args:
          abstract_state: pytree like the train state whose leaves are `jax.ShapeDtypeStruct`s
            with shardings on the current mesh (or concrete arrays, whose shardings are used).
          init_path: an explicit checkpoint to start from when the workdir has none: a
            checkpoint directory (its newest step) or one step directory inside it.

        Returns:
          `Restored` or None. Raises `UnusableCheckpoints` when checkpoints exist but none
          restores (unfinished commits, corrupt files, a changed state structure), rather
          than silently starting over, unless ``restart=True``.
        """
        abstract = codec.as_abstract(abstract_state)
        for tmp in integrity.unfinished_saves(self.directory):
            logger.warning("Ignoring unfinished checkpoint save %s", tmp)
        restored = _restore_newest(
            self._manager, self.directory, abstract, "workdir", True, restart=self.restart
        )
        if restored is not None:
            changed = codec.config_diff(restored.config, self.config) if self.config else []
            if changed:
                logger.warning("Resumed config differs from the saved one in: %s", changed)
            return restored
        if init_path is not None:
            return restore_path(init_path, abstract_state)
        return None


def _restore_step(manager, step: int, abstract, source: str) -> Restored:
    args = ocp.args.Composite(
        state=ocp.args.StandardRestore(codec.abstract_keys_to_data(abstract)),
        data_iter=ocp.args.JsonRestore(),
        config=ocp.args.JsonRestore(),
        meta=ocp.args.JsonRestore(),
    )
    out = manager.restore(step, args=args)
    meta = out["meta"]
    return Restored(
        step=step,
        state=codec.keys_from_data(out["state"], abstract, meta["prng_keys"]),
        data_iter=out["data_iter"]["data_iter"],
        config=codec.config_from_json(out["config"]["config"]),
        metadata=meta.get("run", {}),
        source=source,
        path=str(paths.path(manager.directory) / str(step)),
    )


def _restore_newest(
    manager, directory: Path, abstract, source: str, move_aside: bool, restart: bool = False
):
    """Try steps newest first; warn about and (optionally) move aside unusable ones. When
    none restores: ``move_aside`` (the workdir) refuses unless ``restart``."""
    bad: list[tuple[Path, bool, str]] = []  # (step dir, failed reading arrays, problem)
    for step in sorted(manager.all_steps(), reverse=True):
        step_dir = directory / str(step)
        problem, restored, read_error = integrity.step_problem(step_dir), None, False
        if problem is None:
            try:
                restored = _restore_step(manager, step, abstract, source)
            except Exception as e:  # any failure to read means: try the previous step
                problem, read_error = f"restore failed: {type(e).__name__}: {e}", True
        if all_agree(problem is None):
            if bad:
                logger.warning("Using the checkpoint at step %d (%s) instead", step, step_dir)
            _move_aside([p for p, _, _ in bad] if move_aside else [], manager)
            return restored
        problem = problem or "unreadable on another process"
        logger.warning(
            "Checkpoint at step %d (%s) is incomplete or corrupt: %s. Trying the previous one.",
            step,
            step_dir,
            problem[:2000],
        )
        bad.append((step_dir, read_error, problem))
    if not bad:
        return None
    if move_aside and not restart:
        raise UnusableCheckpoints(_unusable_message(directory, bad))
    if not move_aside and any(read_error for _, read_error, _ in bad):
        raise RuntimeError(
            f"no checkpoint in {directory} restores onto the given target (see the warnings "
            "above); if the state's structure changed, use a new workdir"
        )
    if move_aside:
        logger.warning(
            "checkpoint.restart=True: none of the %d checkpoint(s) in %s restores; moving them "
            "aside and training from step 0", len(bad), directory,
        )  # fmt: skip
        _move_aside([p for p, _, _ in bad], manager)
    return None


def _unusable_message(directory: Path, bad: list) -> str:
    found = "; ".join(f"step {p.name}: {' '.join(problem.split())[:200]}" for p, _, problem in bad)
    hint = ""
    if any(read_error for _, read_error, _ in bad):
        hint = " If the state's structure changed (another model or algorithm), use a new workdir."
    return (
        f"{directory} holds {len(bad)} checkpoint(s) and none restores ({found}). Not "
        f"starting over from step 0 on top of them.{hint} Repair or remove them, or run with "
        "--config.checkpoint.restart=True to move them aside (to <step>.corrupt) and train "
        "from step 0."
    )


def _move_aside(step_dirs: list[Path], manager) -> None:
    if not step_dirs:
        return
    if jax.process_index() == 0:
        for step_dir in step_dirs:
            logger.warning(
                "Moved unusable checkpoint %s to %s", step_dir, integrity.move_aside(step_dir)
            )
    _barrier("mipo_checkpoint_move_aside")
    manager.reload()


def restore_path(path: str | Path, abstract_state) -> Restored:
    """Restore from an explicit checkpoint: a checkpoint directory or one of its step dirs."""
    path = _dir(path)
    abstract = codec.as_abstract(abstract_state)
    options = ocp.CheckpointManagerOptions(read_only=True)
    markers = (integrity.COMMIT_MARKER, integrity.STEP_METADATA, *integrity.ITEMS)
    if path.name.isdigit() and any((path / name).exists() for name in markers):
        with ocp.CheckpointManager(path.parent, options=options) as manager:
            problem = integrity.step_problem(path)
            if problem:
                raise ValueError(f"init checkpoint {path} is unusable: {problem}")
            return _restore_step(manager, int(path.name), abstract, "init")
    with ocp.CheckpointManager(path, options=options) as manager:
        restored = _restore_newest(manager, path, abstract, "init", False)
    if restored is None:
        raise FileNotFoundError(f"no usable checkpoint under init path {path}")
    return restored
