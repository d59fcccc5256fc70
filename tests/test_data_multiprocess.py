"""Two real JAX processes (jax.distributed on CPU, 2 devices each) iterate one dataset.

Each process tokenises only its shard, agrees with the other on batch counts and row lengths
through ``process_allgather``, and builds global arrays with
``jax.make_array_from_process_local_data``. Also runnable as the worker:

    python -m tests.test_data_multiprocess worker OUT.json   (MIPO_* env set)
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
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

    from mipo_jax.data import build, data_config, to_global

    cfg = data_config(source="embedded:controlled", split="test", num_epochs=1, **layout)
    cfg.drop_remainder = False
    it, _ = build(cfg)  # this process's shard, from jax.process_index()/process_count()
    batches = []
    for local in it:
        glob = to_global(local, sharding)
        everyone = multihost_utils.process_allgather(glob["example_id"], tiled=True)
        tokens, pairs = count(glob)
        batches.append(
            dict(
                local=local["example_id"][local["pair_valid"] > 0].tolist(),
                shape=list(glob["tokens"].shape),
                everyone=np.asarray(everyone)[np.asarray(everyone) >= 0].tolist(),
                pairs=float(pairs),
                tokens=float(tokens),
                local_tokens=float(local["mask"].sum()),
            )
        )
    return dict(shard=it.data.example_id.tolist(), batches=batches)


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
            "tests.test_data_multiprocess",
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
def test_two_processes_share_one_dataset(results, layout):
    res = [r[layout] for r in results]
    shards = [set(r["shard"]) for r in res]
    assert not shards[0] & shards[1] and shards[0] | shards[1] == set(range(512))
    assert len(res[0]["batches"]) == len(res[1]["batches"]) > 0
    seen = []
    for b0, b1 in zip(res[0]["batches"], res[1]["batches"]):
        assert b0["shape"] == b1["shape"] and b0["pairs"] == b1["pairs"] == len(b0["local"]) + len(
            b1["local"]
        )
        assert (
            b0["everyone"] == b1["everyone"] == b0["local"] + b1["local"]
        )  # process 0's block first
        assert set(b0["local"]) <= shards[0] and set(b1["local"]) <= shards[1]
        seen += b0["everyone"]
    assert len(seen) == len(set(seen))


if __name__ == "__main__" and sys.argv[1:2] == ["worker"]:
    worker(sys.argv[2])
