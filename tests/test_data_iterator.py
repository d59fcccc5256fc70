"""Iteration: deterministic shuffles, exact resume, disjoint covering shards, global arrays."""

import json
import threading

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from mipo_jax.data import (
    Layout,
    PreferenceIterator,
    build,
    data_config,
    load_rows,
    to_global,
    tokenize_rows,
)
from mipo_jax.data.embedded import load_tokenizer

LAYOUTS = [
    Layout("padded", batch_size=16, bucket_window=4),
    Layout("pairs", rows=2, groups=2, row_length=64),
    Layout("shared_prompt", rows=2, groups=2, row_length=64),
]
IDS = [lay.kind for lay in LAYOUTS]


@pytest.fixture(scope="module")
def words():
    return load_tokenizer("toy_words")


@pytest.fixture(scope="module")
def rows():
    return load_rows("embedded:controlled", split="test")


@pytest.fixture(scope="module")
def data(rows, words):
    return tokenize_rows(rows, words)


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("layout", LAYOUTS, ids=IDS)
def test_resume_mid_epoch_yields_the_identical_stream(data, layout):
    it = PreferenceIterator(data, layout, seed=3)
    per_epoch = it.steps_per_epoch()
    reference = [next(it) for _ in range(per_epoch + 5)]  # crosses an epoch boundary
    for cut in (1, per_epoch // 2, per_epoch - 1, per_epoch + 2):
        first = PreferenceIterator(data, layout, seed=3)
        for _ in range(cut):
            next(first)
        state = json.loads(json.dumps(first.get_state()))  # what a checkpoint stores
        resumed = PreferenceIterator(data, layout, seed=3)
        resumed.set_state(state)
        for want in reference[cut:]:
            assert same(next(resumed), want)


@pytest.mark.parametrize("layout", LAYOUTS, ids=IDS)
def test_shuffle_depends_on_seed_and_epoch_only(data, layout):
    ids = lambda it, n: [tuple(next(it)["example_id"].ravel()) for _ in range(n)]  # noqa: E731
    a, b = PreferenceIterator(data, layout, seed=0), PreferenceIterator(data, layout, seed=0)
    n = a.steps_per_epoch()
    assert ids(a, 2 * n) == ids(b, 2 * n)
    epoch0, epoch1 = (
        ids(PreferenceIterator(data, layout, seed=0), 2 * n)[:n],
        ids(PreferenceIterator(data, layout, seed=0), 2 * n)[n:],
    )
    assert epoch0 != epoch1
    assert ids(PreferenceIterator(data, layout, seed=1), n) != epoch0


def test_state_refuses_other_data_or_layout(data):
    state = PreferenceIterator(data, LAYOUTS[0], seed=0).get_state()
    with pytest.raises(ValueError, match="fingerprint"):
        PreferenceIterator(data, LAYOUTS[1], seed=0).set_state(state)
    with pytest.raises(ValueError, match="fingerprint"):
        PreferenceIterator(data, LAYOUTS[0], seed=1).set_state(state)


class ThreadAllGather:
    """`process_allgather` for processes simulated by threads (a barrier per call)."""

    def __init__(self, n: int):
        self.n, self.slots, self.barrier = n, [None] * n, threading.Barrier(n)

    def for_process(self, p: int):
        def gather(x):
            self.slots[p] = np.asarray(x)
            self.barrier.wait()
            out = np.stack(self.slots)
            self.barrier.wait()
            return out

        return gather


def run_processes(rows, words, layout, n_proc, epochs=1):
    """Each simulated process tokenises only its shard; returns its batches per epoch."""
    gather, out = ThreadAllGather(n_proc), [None] * n_proc

    def work(p):
        local = tokenize_rows(rows, words, process_index=p, process_count=n_proc)
        it = PreferenceIterator(
            local, layout, seed=0, num_epochs=epochs, drop_remainder=False,
            process_index=p, process_count=n_proc, allgather=gather.for_process(p),
        )  # fmt: skip
        out[p] = (local, list(it))

    threads = [threading.Thread(target=work, args=(p,)) for p in range(n_proc)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


@pytest.mark.parametrize("layout", LAYOUTS, ids=IDS)
def test_processes_read_disjoint_shards_that_cover_the_data(rows, words, layout):
    results = run_processes(rows, words, layout, 3)
    shards = [set(local.example_id.tolist()) for local, _ in results]
    assert sum(map(len, shards)) == len(rows) and set().union(*shards) == set(range(len(rows)))
    assert all(a.isdisjoint(b) for i, a in enumerate(shards) for b in shards[i + 1 :])
    n_batches = {len(batches) for _, batches in results}
    assert len(n_batches) == 1  # agreed (the minimum) so that no process waits forever
    for step in range(n_batches.pop()):  # global arrays need equal shapes on every process
        assert len({results[p][1][step]["tokens"].shape for p in range(3)}) == 1
    for (_, batches), shard in zip(results, shards):
        seen = np.concatenate([b["example_id"][b["pair_valid"] > 0] for b in batches])
        assert len(seen) == len(set(seen.tolist())) and set(seen.tolist()) <= shard
    if layout.kind == "padded":  # nothing dropped when every shard fills the same batches
        assert sum(int(b["pair_valid"].sum()) for _, bs in results for b in bs) == len(rows)


def test_build_from_config_and_to_global(rows, words):
    cfg = data_config(
        source="embedded:controlled",
        split="test",
        layout="shared_prompt",
        rows=2,
        groups=8,
        row_length=64,
    )
    it, tok = build(cfg, process_index=0, process_count=1)
    assert tok.name_or_path.endswith("toy_words")
    batch = next(it)
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    glob = to_global(batch, NamedSharding(mesh, P("data")))
    for k, v in batch.items():
        assert glob[k].shape == v.shape and len(glob[k].sharding.device_set) == 8
        np.testing.assert_array_equal(np.asarray(glob[k]), v)
    assert glob["tokens"].addressable_shards[3].data.shape == (1, 2, 64)  # one group per device
