"""Two real JAX processes (jax.distributed on CPU, 2 devices each) iterate one dataset.

Each process yields its block of every global batch and builds global arrays with
``jax.make_array_from_process_local_data``; the global batches are exactly those of one
process with twice the per-process batch. Also runnable as the worker:

    python -m tests.data.test_multiprocess worker OUT.json   (MIPO_* env set)
"""

import hashlib
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
LAYOUTS = {
    "padded": dict(layout="padded", batch_size=4, bucket_window=2),
    "shared_prompt": dict(layout="shared_prompt", rows=2, groups=2, row_length=48),
}


def worker(out: str) -> None:
    import jax
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    from mipo_jax import distributed

    distributed.initialize()
    sharding = NamedSharding(Mesh(np.array(jax.devices()), ("data",)), P("data"))
    count = jax.jit(lambda b: (b["mask"].sum(), b["pair_valid"].sum()))
    results = {layout: run(cfg, sharding, count) for layout, cfg in LAYOUTS.items()}
    Path(out).write_text(json.dumps(results))


def run(layout: dict, sharding, count) -> dict:
    from jax.experimental import multihost_utils

    from mipo_jax.data import build, to_global

    it, _ = build(config(layout))  # this process's blocks, from jax.process_index()/count()
    batches = []
    for local in it:
        glob = to_global(local, sharding)
        everyone = multihost_utils.process_allgather(glob, tiled=True)
        tokens, pairs = count(glob)
        batches.append(
            dict(
                local=local["example_id"][local["pair_valid"] > 0].tolist(),
                everyone=np.asarray(everyone.pop("example_id")).tolist(),
                digest=digest(everyone),
                pairs=float(pairs),
                tokens=float(tokens),
            )
        )
    return dict(data=len(it.data), batches=batches)


def config(layout: dict, processes: int = 1):
    """The data config of ``layout`` with its per-process sizes for ``processes`` of 2."""
    from mipo_jax.data import data_config

    cfg = data_config(source="embedded:controlled", split="test", num_epochs=1, **layout)
    cfg.drop_remainder = False
    if cfg.layout == "padded":
        cfg.batch_size *= processes
    else:
        cfg.groups *= processes
    return cfg


def digest(batch: dict) -> str:
    h = hashlib.sha256()
    for k in sorted(batch):
        h.update(k.encode() + np.ascontiguousarray(np.asarray(batch[k])).tobytes())
    return h.hexdigest()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """Both processes' outputs, for every layout (one launch: JAX starts once per process)."""
    tmp = tmp_path_factory.mktemp("mp")
    port, procs = _free_port(), []
    for p in range(2):
        env = {k: v for k, v in os.environ.items() if not k.startswith(("MIPO_", "JAX_COORD"))}
        env.update(
            XLA_FLAGS="--xla_force_host_platform_device_count=2",
            JAX_PLATFORMS="cpu",
            MIPO_COORDINATOR=f"127.0.0.1:{port}",
            MIPO_NUM_PROCESSES="2",
            MIPO_PROCESS_ID=str(p),
            PYTHONPATH=str(REPO),
        )
        cmd = [
            sys.executable,
            "-m",
            "tests.data.test_multiprocess",
            "worker",
            str(tmp / f"{p}.json"),
        ]
        procs.append(
            subprocess.Popen(
                cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
            )
        )
    for proc in procs:
        try:
            log, _ = proc.communicate(timeout=240)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        assert proc.returncode == 0, log[-4000:]
    return [json.loads((tmp / f"{p}.json").read_text()) for p in range(2)]


@pytest.mark.slow
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_two_processes_split_the_one_process_batches(results, layout):
    from mipo_jax.data import build

    res = [r[layout] for r in results]
    whole, _ = build(config(LAYOUTS[layout], processes=2), process_index=0, process_count=1)
    want = list(whole)
    assert res[0]["data"] == res[1]["data"] == len(whole.data)  # both hold the whole split
    assert len(res[0]["batches"]) == len(res[1]["batches"]) == len(want) > 0
    seen = []
    for b0, b1, w in zip(res[0]["batches"], res[1]["batches"], want):
        assert b0["everyone"] == b1["everyone"] == w["example_id"].tolist()
        assert (
            b0["digest"]
            == b1["digest"]
            == digest({k: v for k, v in w.items() if k != "example_id"})
        )
        valid = w["example_id"][w["pair_valid"] > 0].tolist()
        assert b0["local"] + b1["local"] == valid  # process 0's block first, disjoint
        assert b0["pairs"] == b1["pairs"] == len(valid)
        assert b0["tokens"] == b1["tokens"] == float(w["mask"].sum())
        seen += valid
    assert sorted(seen) == list(range(len(whole.data)))  # one epoch, nothing dropped


if __name__ == "__main__" and sys.argv[1:2] == ["worker"]:
    worker(sys.argv[2])
