"""A tiny NNX + optax training job for the checkpoint and multi-process tests.

Importable (the tests use its model, state and loop in-process) and runnable as the
subprocess those tests launch, each with its own device count:

    python -m tests.multiprocess_worker train --devices 4 --mesh 2,1,2 --workdir W --steps 3 \
        --save-every 2 --out W/losses.json          # resumes from W if it holds a checkpoint
    python -m tests.multiprocess_worker restore --devices 1 --mesh 1,1,1 --workdir W --out r.npz

Several processes: set MIPO_COORDINATOR / MIPO_NUM_PROCESSES / MIPO_PROCESS_ID
(`mipo_jax.distributed.initialize` reads them). The train state is a flax.struct dataclass
holding an `nnx.State` of parameters, the optax state, the step and a typed PRNG key; the
data iterator's state is {"next_batch": k}; batch k is a fixed function of k.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from mipo_jax import distributed
from mipo_jax.checkpoint import Checkpointer, PreemptionGuard, with_shardings

AXES = ("data", "fsdp", "tensor")
BATCH, D_IN, D_HID, D_OUT = 8, 16, 32, 8
BATCH_SPEC = P(("data", "fsdp"))
# (module, parameter) -> spec; optimiser moments get their parameter's spec.
PARAM_SPECS = {
    ("up", "kernel"): P("fsdp", "tensor"),
    ("up", "bias"): P("tensor"),
    ("down", "kernel"): P("tensor", "fsdp"),
    ("down", "bias"): P("fsdp"),
}
TX = optax.adamw(1e-2, weight_decay=0.01)


class TinyMLP(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.up = nnx.Linear(D_IN, D_HID, rngs=rngs)
        self.down = nnx.Linear(D_HID, D_OUT, rngs=rngs)

    def __call__(self, x):
        return self.down(jax.nn.gelu(self.up(x)))


GRAPHDEF = nnx.graphdef(nnx.eval_shape(lambda: TinyMLP(nnx.Rngs(0))))


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any  # nnx.State
    opt_state: Any
    rng: jax.Array  # typed PRNG key


def init_state(seed: int = 0) -> TrainState:
    params = nnx.state(TinyMLP(nnx.Rngs(seed)))
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=TX.init(params),
        rng=jax.random.key(seed + 1),
    )


def _names(path) -> tuple[str, ...]:
    return tuple(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", "")))) for k in path)


def spec_for(path) -> P:
    names = _names(path)
    for pair, spec in PARAM_SPECS.items():
        if any(names[i : i + 2] == pair for i in range(len(names) - 1)):
            return spec
    return P()


def state_shardings(mesh: Mesh):
    abstract = jax.eval_shape(init_state)
    return jax.tree_util.tree_map_with_path(
        lambda path, _: NamedSharding(mesh, spec_for(path)), abstract
    )


def abstract_state(mesh: Mesh):
    return with_shardings(jax.eval_shape(init_state), state_shardings(mesh))


def loss_fn(params, x, y):
    pred = nnx.merge(GRAPHDEF, params)(x)
    return jnp.mean((pred - y) ** 2)


def train_step(state: TrainState, batch) -> tuple[TrainState, jax.Array]:
    rng, noise = jax.random.split(state.rng)
    x = batch["x"] + 0.01 * jax.random.normal(noise, batch["x"].shape)
    loss, grads = jax.value_and_grad(loss_fn)(state.params, x, batch["y"])
    updates, opt_state = TX.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    new = state.replace(step=state.step + 1, params=params, opt_state=opt_state, rng=rng)
    return new, loss


def jit_step(mesh: Mesh):
    shardings = state_shardings(mesh)
    batch = {"x": NamedSharding(mesh, BATCH_SPEC), "y": NamedSharding(mesh, BATCH_SPEC)}
    return jax.jit(
        train_step,
        in_shardings=(shardings, batch),
        out_shardings=(shardings, NamedSharding(mesh, P())),
        donate_argnums=0,
    )


def global_batch(k: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng([1234, k])
    x = rng.standard_normal((BATCH, D_IN), dtype=np.float32)
    return {"x": x, "y": np.sin(x[:, :D_OUT] * 2.0 + 0.5).astype(np.float32)}


class Data:
    """Deterministic batches; the state is the index of the next batch."""

    def __init__(self, next_batch: int = 0):
        self.next_batch = next_batch

    def get_state(self) -> dict:
        return {"next_batch": self.next_batch}

    def next_global(self, mesh: Mesh):
        rows = distributed.local_batch_slice(BATCH, mesh, BATCH_SPEC)
        local = {k: v[rows] for k, v in global_batch(self.next_batch).items()}
        self.next_batch += 1
        return distributed.make_global_batch(local, mesh, BATCH_SPEC)


def make_mesh(sizes) -> Mesh:
    """Mesh over the first prod(sizes) devices (all of them in the workers)."""
    sizes = tuple(sizes)
    return Mesh(np.asarray(jax.devices()[: int(np.prod(sizes))]).reshape(sizes), AXES)


def make_checkpointer(workdir, save_every: int, keep: int = 3) -> Checkpointer:
    config = ml_collections.ConfigDict({"model": {"d_hidden": D_HID}, "save_every": save_every})
    return Checkpointer(
        os.path.join(workdir, "checkpoints"),
        save_every=save_every,
        keep=keep,
        config=config,
        metadata={"reference": {"source": "none: tiny test model"}},
    )


def run_training(ckpt: Checkpointer, mesh: Mesh, total_steps: int, *, sleep=0.0, log=None):
    """The loop the trainer runs: resume, step, periodic async saves, preemption, final save."""
    step_fn = jit_step(mesh)
    restored = ckpt.restore_or_none(abstract_state(mesh))
    if log:
        log(f"RESUMED {restored.step}" if restored else "FRESH")
    if restored is None:
        state, data, step = jax.jit(init_state, out_shardings=state_shardings(mesh))(), Data(), 0
    else:
        state, data, step = restored.state, Data(**restored.data_iter), restored.step
    start, losses, stopped = step, {}, False
    with PreemptionGuard() as guard:
        while step < total_steps and not stopped:
            state, loss = step_fn(state, data.next_global(mesh))
            step += 1
            losses[step] = float(loss.addressable_data(0))
            if log:
                log(f"STEP {step} loss {losses[step]:.6f}")
            ckpt.save(step, state, data_iter=data.get_state())
            stopped = guard.should_stop(step)
            time.sleep(sleep)
    ckpt.save(step, state, data_iter=data.get_state(), force=True, wait=True)
    if log:
        log(f"SAVED {step}")
    return {"start": start, "end": step, "stopped": stopped, "losses": losses, "state": state}


def flatten(state) -> dict[str, np.ndarray]:
    """{path: numpy value} (typed keys as key data) for fully addressable states."""
    leaves = jax.tree_util.tree_flatten_with_path(state)[0]
    out = {}
    for path, x in leaves:
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            x = jax.random.key_data(x)
        out[jax.tree_util.keystr(path)] = np.asarray(x)
    return out


def specs(state) -> dict[str, str]:
    leaves = jax.tree_util.tree_flatten_with_path(state)[0]
    return {
        jax.tree_util.keystr(p): f"{dict(x.sharding.mesh.shape)} {x.sharding.spec}"
        for p, x in leaves
    }


def _cmd_train(args, mesh):
    ckpt = make_checkpointer(args.workdir, args.save_every)
    result = run_training(ckpt, mesh, args.steps, sleep=args.sleep, log=trace)
    ckpt.close()
    result.pop("state")
    out = args.out.format(pid=jax.process_index())
    with open(out, "w") as f:
        json.dump({**result, "losses": {k: v.hex() for k, v in result["losses"].items()}}, f)
    trace(f"DONE {result['end']} stopped={result['stopped']}")


def _cmd_restore(args, mesh):
    """Restore the newest checkpoint onto `mesh`, take one step; write both to an .npz."""
    ckpt = make_checkpointer(args.workdir, args.save_every)
    restored = ckpt.restore_or_none(abstract_state(mesh))
    ckpt.close()
    state = restored.state
    leaves = jax.tree_util.tree_flatten_with_path(state)[0]
    dtypes = {jax.tree_util.keystr(p): str(x.dtype) for p, x in leaves}
    arrays = {f"restored/{k}": v for k, v in flatten(state).items()}
    spec_json = json.dumps(specs(state))  # before the step donates `state`
    new, loss = jit_step(mesh)(state, Data(**restored.data_iter).next_global(mesh))
    arrays.update({f"next/{k}": v for k, v in flatten(new).items()})
    extra = {
        "specs": spec_json,
        "dtypes": json.dumps(dtypes),
        "config": json.dumps(restored.config.to_dict()),
        "loss": np.asarray(loss),
        "step": restored.step,
    }
    np.savez(args.out, **arrays, **{k: np.asarray(v) for k, v in extra.items()})
    trace(f"RESTORED {restored.step}")


# ---- launching workers from the tests ------------------------------------------------------

REPO = Path(__file__).resolve().parents[1]
TIMEOUT_S = 240  # per subprocess group: generous for a loaded 2-core CI box, still ends a hang
_DIST_ENV = ("MIPO_", "JAX_COORDINATOR", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def subprocess_env(devices: int, env: dict | None = None) -> dict:
    """This environment without multi-process settings, `devices` CPU devices, plus `env`."""
    full = {k: v for k, v in os.environ.items() if not k.startswith(_DIST_ENV)}
    full.update(
        XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
        JAX_PLATFORMS="cpu",
        PYTHONPATH=os.pathsep.join([str(REPO), full.get("PYTHONPATH", "")]),
        **(env or {}),
    )
    return full


def launch(args: list[str], devices: int, env: dict | None = None) -> subprocess.Popen:
    """Start a worker with `devices` CPU devices (its own XLA_FLAGS), output piped."""
    cmd = [sys.executable, "-m", "tests.multiprocess_worker", *args, "--devices", str(devices)]
    return subprocess.Popen(
        cmd,
        cwd=REPO,
        env=subprocess_env(devices, env),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def finish(procs: list[subprocess.Popen], timeout: float = TIMEOUT_S) -> list[str]:
    """Wait for every worker; kill them all and fail on a timeout or a non-zero exit."""
    deadline, outputs, failed = time.monotonic() + timeout, [], []
    for proc in procs:
        try:
            out, _ = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            out, _ = proc.communicate()
            failed.append(f"timed out after {timeout:.0f}s")
        outputs.append(out)
        if proc.returncode != 0:
            failed.append(f"exit code {proc.returncode}")
    if failed:
        tails = "\n".join(f"--- worker {i} ---\n{o[-4000:]}" for i, o in enumerate(outputs))
        raise AssertionError(f"worker failure ({', '.join(failed)}):\n{tails}")
    return outputs


def launch_processes(args: list[str], num_processes: int, devices: int) -> list[subprocess.Popen]:
    """`num_processes` workers joined by jax.distributed on a fresh 127.0.0.1 port."""
    env = {"MIPO_COORDINATOR": f"127.0.0.1:{free_port()}", "MIPO_NUM_PROCESSES": str(num_processes)}
    return [launch(args, devices, {**env, "MIPO_PROCESS_ID": str(i)}) for i in range(num_processes)]


# ---- the worker ----------------------------------------------------------------------------

_T0 = time.time()


def trace(msg: str) -> None:
    """Progress line with elapsed seconds (the tests show them when a subprocess fails)."""
    print(f"[{time.time() - _T0:7.2f}s p{jax.process_index()}] {msg}", flush=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("command", choices=["train", "restore"])
    parser.add_argument("--devices", type=int, required=True)
    parser.add_argument("--mesh", required=True, help="data,fsdp,tensor sizes")
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--save-every", type=int, default=2)
    parser.add_argument("--sleep", type=float, default=0.0)
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    jax.config.update("jax_num_cpu_devices", args.devices)
    distributed.initialize(initialization_timeout=60)
    trace(f"started: {jax.process_count()} processes, {jax.device_count()} devices")
    mesh = make_mesh(int(s) for s in args.mesh.split(","))
    {"train": _cmd_train, "restore": _cmd_restore}[args.command](args, mesh)
    trace("finished")
    if jax.process_count() > 1:
        jax.distributed.shutdown()
        trace("shut down")
    return 0


if __name__ == "__main__":
    sys.exit(main())
