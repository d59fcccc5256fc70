"""Multi-process JAX: start-up from flags or the environment, process-0 logging, global batches.

One process per host (or, for tests, several processes on one machine) runs the same program;
each sees its local devices and JAX stitches them into one global mesh. Call `initialize()`
first thing in `main`, before any JAX computation:

    from mipo_jax import distributed
    distributed.initialize()                  # no-op when nothing says "multi-process"
    distributed.log_info("devices: %d global, %d local", jax.device_count(),
                         jax.local_device_count())          # printed by process 0 only

`initialize` takes each setting from its argument, else `MIPO_COORDINATOR`,
`MIPO_NUM_PROCESSES`, `MIPO_PROCESS_ID`, else the JAX names `JAX_COORDINATOR_ADDRESS`,
`JAX_NUM_PROCESSES`, `JAX_PROCESS_ID`. With none of them set (or one process) it does nothing,
unless `auto=True` / `MIPO_DISTRIBUTED=auto`, which lets JAX detect a managed cluster (Cloud
TPU, SLURM, Open MPI, Kubernetes): launch/run_tpu.sh and launch/run_slurm.sh set it. Under
SLURM, JAX reads SLURM_JOB_ID, SLURM_STEP_NODELIST, SLURM_NTASKS, SLURM_PROCID and
SLURM_LOCALID: the coordinator is the step's first node at port 61440 + job id mod 4096
(JAX_COORDINATOR_PORT overrides the port), and each process drives GPU number SLURM_LOCALID
of its node unless JAX_LOCAL_DEVICE_IDS says otherwise. Two local CPU processes with 2
devices each:

    XLA_FLAGS=--xla_force_host_platform_device_count=2 MIPO_COORDINATOR=127.0.0.1:23456 \
      MIPO_NUM_PROCESSES=2 MIPO_PROCESS_ID=0 python -m mipo_jax.main ... &
    (the same with MIPO_PROCESS_ID=1)

CPU collectives across processes use gloo (JAX's default on CPU).

Batches: each process loads only its rows of the global batch (`local_batch_slice`) and
`make_global_batch` assembles the global sharded arrays with
`jax.make_array_from_process_local_data`. In one process the local batch is the global batch.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

logger = logging.getLogger("mipo_jax")

ENV_COORDINATOR = ("MIPO_COORDINATOR", "JAX_COORDINATOR_ADDRESS")
ENV_NUM_PROCESSES = ("MIPO_NUM_PROCESSES", "JAX_NUM_PROCESSES")
ENV_PROCESS_ID = ("MIPO_PROCESS_ID", "JAX_PROCESS_ID")
ENV_AUTO = "MIPO_DISTRIBUTED"
BATCH_SPEC = PartitionSpec(("data", "fsdp"))


def _from_env(value, names: tuple[str, ...], env: Mapping[str, str], convert=str):
    if value is not None:
        return value
    for name in names:
        if env.get(name, "") != "":
            try:
                return convert(env[name])
            except ValueError as e:
                raise ValueError(f"environment variable {name}={env[name]!r}: {e}") from None
    return None


def resolve(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    env: Mapping[str, str] | None = None,
) -> tuple[str | None, int | None, int | None]:
    """(coordinator, num_processes, process_id): each from its argument, else the environment."""
    env = os.environ if env is None else env
    return (
        _from_env(coordinator_address, ENV_COORDINATOR, env),
        _from_env(num_processes, ENV_NUM_PROCESSES, env, int),
        _from_env(process_id, ENV_PROCESS_ID, env, int),
    )


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    auto: bool | None = None,
    initialization_timeout: int = 300,
) -> bool:
    """Start `jax.distributed` when settings say so; returns whether it is running.

    Does nothing for one process (no settings, or a process count of 1). Raises ValueError
    when only some of the three settings are given. Calling it again is harmless.
    """
    if jax.distributed.is_initialized():
        return True
    coordinator, count, pid = resolve(coordinator_address, num_processes, process_id)
    auto = os.environ.get(ENV_AUTO, "") == "auto" if auto is None else auto
    if count == 1 or (coordinator is None and count is None and pid is None and not auto):
        return False
    if not auto:
        missing = [
            names[0]
            for names, value in zip(
                (ENV_COORDINATOR, ENV_NUM_PROCESSES, ENV_PROCESS_ID), (coordinator, count, pid)
            )
            if value is None
        ]
        if missing:
            raise ValueError(
                "multi-process start needs the coordinator address, the process count and "
                f"this process's id; missing: {', '.join(missing)} (flag or environment)"
            )
    jax.distributed.initialize(
        coordinator_address=coordinator,
        num_processes=count,
        process_id=pid,
        initialization_timeout=initialization_timeout,
    )
    log_info(
        "jax.distributed: %d processes, coordinator %s, %d global / %d local devices",
        jax.process_count(),
        coordinator or f"{_detected_coordinator()} (detected)",
        jax.device_count(),
        jax.local_device_count(),
    )
    return True


def _detected_coordinator() -> str | None:
    """The address JAX's cluster detection chose (for the log only; a private attribute)."""
    from jax._src import distributed as jax_distributed

    return getattr(jax_distributed.global_state, "coordinator_address", None)


def is_main_process() -> bool:
    """True on process 0: the one that logs, writes metrics and exports."""
    return jax.process_index() == 0


def all_agree(ok: bool) -> bool:
    """True when ``ok`` holds on every process (a collective when several processes run)."""
    if jax.process_count() == 1:
        return ok
    from jax.experimental import multihost_utils

    return bool(np.all(multihost_utils.process_allgather(np.asarray(int(ok), np.int32))))


def log_info(msg: str, *args) -> None:
    """`logging.info` on process 0 only (other processes stay quiet)."""
    if is_main_process():
        logger.info(msg, *args)


def log_warning(msg: str, *args) -> None:
    """`logging.warning` on process 0 only; use the logger directly for per-process trouble."""
    if is_main_process():
        logger.warning(msg, *args)


def _spec_tree(tree, pspec):
    if isinstance(pspec, PartitionSpec):
        return jax.tree.map(lambda _: pspec, tree)
    return pspec


def local_batch_slice(
    global_batch_size: int, mesh: Mesh, pspec: PartitionSpec = BATCH_SPEC
) -> slice:
    """Rows [start, stop) of the global batch this process must load (axis 0 sharded by pspec)."""
    sharding = NamedSharding(mesh, PartitionSpec(*pspec[:1]))
    index_map = sharding.addressable_devices_indices_map((global_batch_size,))
    starts = sorted({idx[0].indices(global_batch_size)[:2] for idx in index_map.values()})
    lo, hi = starts[0][0], starts[-1][1]
    if sum(b - a for a, b in starts) != hi - lo:
        raise ValueError(f"this process's rows of the batch are not contiguous: {starts}")
    return slice(lo, hi)


def make_global_batch(local_tree, mesh: Mesh, pspec=BATCH_SPEC):
    """Global sharded arrays from each process's rows (numpy) of the batch.

    Args:
      local_tree: pytree of numpy arrays; axis 0 holds this process's rows, as given by
        `local_batch_slice` (in one process: the whole batch).
      mesh: the global mesh.
      pspec: one PartitionSpec for every leaf (naming leading axes only), or a pytree of them.

    Returns:
      The same pytree of `jax.Array`s with global shape and `NamedSharding(mesh, spec)`.
    """
    specs = _spec_tree(local_tree, pspec)
    return jax.tree.map(
        lambda x, spec: jax.make_array_from_process_local_data(
            NamedSharding(mesh, spec), np.asarray(x)
        ),
        local_tree,
        specs,
    )
