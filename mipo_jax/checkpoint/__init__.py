"""Checkpoints: orbax `CheckpointManager` wrapper, cross-mesh restore, preemption handling.

    from mipo_jax.checkpoint import Checkpointer, PreemptionGuard, with_shardings

    ckpt = Checkpointer(workdir / "checkpoints", save_every=cfg.save_every, keep=3,
                        config=cfg, metadata={"reference": {"source": ..., "revision": ...}})
    abstract = with_shardings(jax.eval_shape(init_state, rng), state_shardings)
    restored = ckpt.restore_or_none(abstract, init_path=cfg.init_path or None)
    state, start = (restored.state, restored.step) if restored else (init_state(rng), 0)
    if restored: data.set_state(restored.data_iter)
    with PreemptionGuard() as guard, ckpt:          # a signal during ckpt.close() only flags
        step = start
        while step < total:
            state, metrics = train_step(state, next(data))
            step += 1
            ckpt.save(step, state, data_iter=data.get_state())   # async, every save_every
            if guard.should_stop(step):                          # SIGTERM/SIGINT (all processes)
                break
        ckpt.save(step, state, data_iter=data.get_state(), force=True, wait=True)

See `manager` (what is stored, resume order, corrupt-checkpoint fallback, refusing to start
over unusable checkpoints, failed saves), `preemption` (SIGTERM, SIGINT) and `codec` (PRNG
keys, abstract targets, config JSON).
"""

from mipo_jax.checkpoint.codec import as_abstract, config_from_json, config_to_json, with_shardings
from mipo_jax.checkpoint.manager import (
    Checkpointer,
    CheckpointSaveError,
    Restored,
    UnusableCheckpoints,
    restore_path,
)
from mipo_jax.checkpoint.preemption import PreemptionGuard

__all__ = [
    "CheckpointSaveError",
    "Checkpointer",
    "PreemptionGuard",
    "Restored",
    "UnusableCheckpoints",
    "as_abstract",
    "config_from_json",
    "config_to_json",
    "restore_path",
    "with_shardings",
]
