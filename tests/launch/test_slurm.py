"""The SLURM launcher: launch/slurm.sbatch -> srun -> launch/run_slurm.sh -> mipo_jax.main.

A fake `srun` (tests/launch/bin/srun) starts the job step's tasks on this machine with the
variables real srun gives them; the batch script runs as sbatch would run it, with the
job's variables. Nothing names a coordinator: JAX's own SLURM detection finds it (first
node of the step, port 61440 + job id mod 4096), as on a cluster.
"""

import json
import os
import random
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests import multiprocess_worker as w
from tests.train import test_main_multiprocess as mp

BIN = Path(__file__).resolve().parent / "bin"
SLURM_PORTS = (61440, 4096)  # JAX: port = 61440 + job id mod 4096 (slurm_cluster.py)


def node_name() -> str:
    """This host as SLURM would list it (a name that resolves), else localhost."""
    name = socket.gethostname()
    try:
        socket.gethostbyname(name)
        return name
    except OSError:
        return "localhost"


def job_id_with_free_port() -> int:
    """A job id whose SLURM-derived coordinator port is free on this machine now."""
    first, count = SLURM_PORTS
    for _ in range(100):
        job = random.randrange(10**5, 10**7)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("0.0.0.0", first + job % count))
                return job
            except OSError:
                continue
    raise RuntimeError("no free port in SLURM's range 61440-65535")


def job_env(tasks: int, devices: int, extra: dict | None = None) -> dict:
    """What sbatch gives a batch script (one node, `tasks` tasks), plus the fake srun on PATH
    and this interpreter; no SLURM or coordinator settings leak in from outside."""
    env = {k: v for k, v in w.subprocess_env(devices).items() if not k.startswith("SLURM_")}
    env.update(
        PATH=os.pathsep.join([str(BIN), env["PATH"]]),
        MIPO_PYTHON=sys.executable,
        SLURM_JOB_ID=str(job_id_with_free_port()),
        SLURM_JOB_NODELIST=node_name(),
        SLURM_NTASKS=str(tasks),
        SLURM_NNODES="1",
        SLURM_TASKS_PER_NODE=str(tasks),
        SLURM_SUBMIT_DIR=str(w.REPO),
        **(extra or {}),
    )
    return env


DETECT = (
    "import json; from jax._src.clusters.slurm_cluster import SlurmCluster as S; "
    "print(json.dumps([S.is_env_present(), S.get_coordinator_address(None, None), "
    "S.get_process_count(), S.get_process_id(), S.get_local_process_id()]))"
)


def test_fake_srun_gives_each_task_what_jax_detects():
    env = job_env(tasks=2, devices=1)
    cmd = ["srun", "--kill-on-bad-exit=1", sys.executable, "-c", DETECT]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120, check=True)
    port = SLURM_PORTS[0] + int(env["SLURM_JOB_ID"]) % SLURM_PORTS[1]
    coordinator = f"{node_name()}:{port}"
    got = sorted(json.loads(line) for line in out.stdout.splitlines())
    assert got == [[True, coordinator, 2, 0, 0], [True, coordinator, 2, 1, 1]]


def test_fake_srun_ends_the_step_when_a_task_fails():
    env = job_env(tasks=2, devices=1)
    script = "import os, sys, time; os.environ['SLURM_PROCID'] == '1' and sys.exit(3); "
    script += "time.sleep(60)"
    proc = subprocess.run(
        ["srun", sys.executable, "-c", script], env=env, capture_output=True, timeout=30
    )
    assert proc.returncode != 0


STUB = """import json, os, sys
keys = ("JAX_LOCAL_DEVICE_IDS", "MIPO_DISTRIBUTED", "MIPO_COORDINATOR")
print(json.dumps({"argv": sys.argv[1:], **{k: os.environ.get(k) for k in keys}}))
"""


def run_task(tmp_path, env: dict, *args: str) -> subprocess.CompletedProcess:
    """launch/run_slurm.sh as one task, with a stub interpreter that prints what it got."""
    stub = tmp_path / "python"
    stub.write_text(f"#!{sys.executable}\n{STUB}")
    stub.chmod(0o755)
    full = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "CUDA_", "JAX_"))}
    full.update({"MIPO_PYTHON": str(stub), "PATH": "/usr/bin:/bin", **env})
    return subprocess.run(
        ["bash", str(w.REPO / "launch" / "run_slurm.sh"), *args],
        env=full, capture_output=True, text=True, timeout=30,
    )  # fmt: skip


@pytest.mark.parametrize(
    "visible, tasks_per_node, node, local_id, want",
    [
        (None, "2", "0", "1", None),  # no GPU: nothing to choose (CPU runs, as here)
        ("0,1,2,3,4,5,6,7", "8(x2)", "1", "5", "5"),  # one process per GPU
        ("0,1,2,3,4,5,6,7", "1(x2)", "1", "0", "0,1,2,3,4,5,6,7"),  # one per node: all
        ("0,1,2,3,4,5,6,7", "2", "0", "1", "4,5,6,7"),  # 4 GPUs per process: block 1
        ("3", "8", "0", "3", "0"),  # SLURM bound the task to its GPU: the one it sees
        ("0,1,2,3", "8,4", "1", "2", "2"),  # uneven nodes: node 1 runs 4 tasks
    ],
)
def test_run_slurm_picks_the_task_gpus(tmp_path, visible, tasks_per_node, node, local_id, want):
    env = dict(SLURM_PROCID="0", SLURM_LOCALID=local_id, SLURM_NODEID=node,
               SLURM_STEP_TASKS_PER_NODE=tasks_per_node)  # fmt: skip
    if visible is not None:
        env["CUDA_VISIBLE_DEVICES"] = visible
    proc = run_task(tmp_path, env, "--config=configs/dpo.py:tiny", "--workdir=/tmp/a b")
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout)
    assert got == {
        "argv": ["-m", "mipo_jax.main", "--config=configs/dpo.py:tiny", "--workdir=/tmp/a b"],
        "JAX_LOCAL_DEVICE_IDS": want,
        "MIPO_DISTRIBUTED": "auto",
        "MIPO_COORDINATOR": None,
    }


def test_run_slurm_refuses_what_it_cannot_run(tmp_path):
    no_task = run_task(tmp_path, {})
    assert no_task.returncode != 0 and "submit launch/slurm.sbatch" in no_task.stderr
    uneven = dict(SLURM_PROCID="0", SLURM_LOCALID="0", SLURM_STEP_TASKS_PER_NODE="3",
                  CUDA_VISIBLE_DEVICES="0,1,2,3")  # fmt: skip
    proc = run_task(tmp_path, uneven)
    assert proc.returncode != 0 and "do not split over 3 tasks" in proc.stderr
    no_venv = run_task(tmp_path, {"MIPO_PYTHON": str(tmp_path / "missing")})
    assert no_venv.returncode == 2 and "run_slurm.sh setup" in no_venv.stderr


@pytest.mark.slow
def test_sbatch_two_tasks_train_like_one_process(tmp_path):
    """2 SLURM tasks x 2 CPU devices through sbatch/srun and JAX's detection: the same
    metrics and final weights, bitwise, as one process with 4 devices (the reasoning for
    the (2, 1, 2) mesh is in tests/train/test_main_multiprocess.py)."""
    env = {
        "JAX_COMPILATION_CACHE_DIR": str(tmp_path / "xla_cache"),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
        "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
        "JAX_DISABLE_MOST_OPTIMIZATIONS": "1",
        "MIPO_JAX_CACHE": str(tmp_path / "cache"),
    }
    one, two = tmp_path / "one", tmp_path / "two"
    args = [*mp.ARGS, f"--workdir={two}", "--config.train.num_steps=2",
            f"--config.reference.cache_dir={tmp_path / 'ref_two'}"]  # fmt: skip
    sbatch = subprocess.Popen(
        ["bash", str(w.REPO / "launch" / "slurm.sbatch"), *args],
        cwd=tmp_path,  # sbatch runs the script from its spool directory, not the repository
        env=job_env(tasks=2, devices=2, extra=env),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    outputs = w.finish([sbatch] + mp.main(one, 2, 1, 4, env, tmp_path / "ref_one"))
    assert "jax.distributed: 2 processes" in outputs[0] and "(detected)" in outputs[0]
    assert (two / "checkpoints" / "2").is_dir()
    weights = [(d / "export" / "model.safetensors").read_bytes() for d in (one, two)]
    assert weights[0] == weights[1]
    want, got = mp.metrics(one), mp.metrics(two)
    assert {("train", 1), ("train", 2), ("eval", 0), ("eval", 2)} <= set(want)
    assert got == want
