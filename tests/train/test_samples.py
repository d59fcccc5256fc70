"""Sampling on the step's mesh: the same tokens as on one device, whatever the sharding.

`sample_completions` splits the rows over the batch axes (`Sampler.sharding`), with the
parameters in their training sharding, and gathers every row back; the random bits of each
(row, token) do not depend on the split, and the rows added to fill the last shard change no
real row. (Across processes: tests/train/test_main_multiprocess.py.)
"""

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from mipo_jax.models import CausalLM, ModelConfig
from mipo_jax.sharding import make_mesh
from mipo_jax.train import checks
from mipo_jax.train import state as st
from mipo_jax.train.samples import Sampler, sample_completions
from tests.train import baseline as B

CFG = ModelConfig(
    family="llama", vocab_size=61, hidden_size=32, intermediate_size=64, num_layers=2,
    num_heads=4, num_kv_heads=2, head_dim=8, max_position_embeddings=128, tie_embeddings=True,
    bos_token_id=1, eos_token_id=2, pad_token_id=0, compute_dtype="float32",
)  # fmt: skip
PROMPTS = [[5, 6, 7], [9], [3, 4, 5, 6, 7, 8, 9, 10, 11], [12, 13], [20, 21, 22]]  # 5 x k=3 rows


def _sample(sizes, sharded: bool):
    mesh = make_mesh(sizes, devices=jax.devices()[: int(np.prod(sizes))])
    graph, params, _ = st.create_params(lambda: CausalLM(CFG, rngs=nnx.Rngs(0)), mesh)
    # a fresh tied model repeats its input token; flatter logits (all weights x 0.2, the
    # logits x 0.04) make every row a real draw
    params = jax.tree.map(lambda x: x * 0.2, params)
    batch = NamedSharding(mesh, PartitionSpec(("data", "fsdp"))) if sharded else None
    sampler = Sampler(graph, max_new_tokens=12, eos_ids=(2,), pad_id=0, sharding=batch)
    return sample_completions(sampler, params, PROMPTS, 3, seed=7)


@pytest.fixture
def fast_compile():
    old = jax.config.values["jax_disable_most_optimizations"]
    jax.config.update("jax_disable_most_optimizations", True)
    yield
    jax.config.update("jax_disable_most_optimizations", old)


def test_sharded_sampling_equals_one_device(fast_compile):
    want = _sample((1, 1, 1), sharded=False)
    got = _sample((2, 2, 2), sharded=True)  # 15 rows on 4 batch shards: one row added
    assert got == want
    assert len({tuple(s) for s in want}) > 10  # samples, not one repeated answer
    assert all(1 <= len(s) <= 12 for s in want) and any(s[-1] == 2 for s in want)


def test_runtime_checks_of_several_processes():
    checks.validate_runtime(B.make_config("dice:tiny"), 2)  # rounds run multi-process now
    checks.validate_runtime(B.make_config("mipo_learned:tiny"), 4)
    config = B.make_config("spin:tiny")
    with pytest.raises(ValueError, match="batch_size=4.*multiple of 3"):
        checks.validate_runtime(config, 3)
