"""Iteration: deterministic shuffles, exact resume, one global stream split over processes."""

import dataclasses
import json

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
from mipo_jax.train.data import unpair

LAYOUTS = [
    Layout("padded", batch_size=16, bucket_window=4),
    Layout("pairs", rows=2, groups=4, row_length=64),
    Layout("shared_prompt", rows=2, groups=4, row_length=64),
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


def split(layout: Layout, n: int) -> Layout:
    """The per-process layout of ``n`` processes sharing ``layout``'s global batch."""
    if layout.packed:
        return dataclasses.replace(layout, groups=layout.groups // n)
    return dataclasses.replace(layout, batch_size=layout.batch_size // n)


def stream(data, layout, n=1, p=0, **kw):
    return PreferenceIterator(data, layout, seed=0, process_index=p, process_count=n, **kw)


@pytest.fixture(scope="module")
def unpaired(rows, words):  # KTO rows: the KL completions cycle through the global batch
    return tokenize_rows(unpair(rows), words)


@pytest.mark.parametrize("drop_remainder", [True, False], ids=["drop", "keep"])
@pytest.mark.parametrize("layout", [*LAYOUTS, "unpaired"], ids=[*IDS, "padded-unpaired"])
def test_processes_split_each_batch_of_the_one_process_stream(
    data, unpaired, layout, drop_remainder
):
    if layout == "unpaired":
        data, layout = unpaired, LAYOUTS[0]
    kw = dict(num_epochs=2, drop_remainder=drop_remainder)
    whole = list(stream(data, layout, **kw))
    for n in (2, 4):
        parts = [list(stream(data, split(layout, n), n, p, **kw)) for p in range(n)]
        assert [len(x) for x in parts] == [len(whole)] * n
        for step, want in enumerate(whole):
            blocks = [x[step] for x in parts]
            assert same({k: np.concatenate([b[k] for b in blocks]) for k in want}, want), step
            ids = [set(b["example_id"][b["pair_valid"] > 0].tolist()) for b in blocks]
            assert all(a.isdisjoint(b) for i, a in enumerate(ids) for b in ids[i + 1 :])
    epochs = np.split(np.arange(len(whole)), 2)
    for e in epochs:  # keep: every example exactly once per epoch; drop: no repeats
        seen = np.concatenate([whole[i]["example_id"][whole[i]["pair_valid"] > 0] for i in e])
        assert len(seen) == len(set(seen.tolist()))
        if not drop_remainder:
            assert sorted(seen.tolist()) == sorted(data.example_id.tolist())


@pytest.mark.parametrize("layout", LAYOUTS, ids=IDS)
def test_state_is_global_and_resumes_under_another_process_count(data, layout):
    one = stream(data, layout)
    reference = [next(one) for _ in range(7)]
    two = [stream(data, split(layout, 2), 2, p) for p in range(2)]
    for _ in range(3):
        for it in two:
            next(it)
    state = two[0].get_state()
    assert two[1].get_state() == state  # what a multi-process checkpoint stores
    four = [stream(data, split(layout, 4), 4, p) for p in range(4)]
    for it in four:
        it.set_state(json.loads(json.dumps(state)))
    for want in reference[3:]:
        got = [next(it) for it in four]
        assert same({k: np.concatenate([g[k] for g in got]) for k in want}, want)
    bigger = stream(data, layout, 2, 0)  # the same per-process layout: twice the global batch
    with pytest.raises(ValueError, match="another global batch"):
        bigger.set_state(state)


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
