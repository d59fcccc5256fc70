"""Config checks that run before data, models or compilation (mipo_jax.train.checks)."""

import math

import pytest

from configs import dpo
from mipo_jax.train import checks, setup


def tiny(**mesh):
    config = dpo.get_config("tiny")
    config.mesh.update(mesh)
    return config


@pytest.mark.parametrize("lr", [math.inf, -math.inf, math.nan, 0.0])
def test_learning_rate_must_be_finite_and_positive(lr):
    config = tiny()
    config.optim.learning_rate = lr
    with pytest.raises(ValueError, match="optim.learning_rate=.* finite and > 0"):
        checks.validate(config)
    config = tiny()
    config.sft.steps = 2
    config.sft.learning_rate = lr
    with pytest.raises(ValueError, match="sft.learning_rate=.* finite and > 0"):
        checks.validate(config)


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("hidden_size", 0, "model.hidden_size=0 is out of range: >= 1"),
        ("num_heads", 0, "model.num_heads=0 is out of range: >= 1"),
        ("num_kv_heads", 0, "model.num_kv_heads=0 is out of range: >= 1"),
        ("num_layers", -1, "model.num_layers=-1 is out of range: >= 1"),
        ("head_dim", 0, "model.head_dim=0 is out of range: >= 1"),
        ("vocab_size", -5, "model.vocab_size=-5 is out of range"),
        ("num_kv_heads", 3, "model.num_kv_heads=3 is out of range: must divide model.num_heads=4"),
    ],
)
def test_random_model_sizes_are_checked(key, value, message):
    config = tiny()
    config.model[key] = value
    with pytest.raises(ValueError, match=message):
        checks.validate(config)


def test_batch_must_split_over_data_parallel_devices(tmp_path):
    # 8 simulated devices: data=3 takes the first 3; batch_size=4 does not split over them
    config = tiny(data=3)
    with pytest.raises(ValueError, match=r"batch_size=4: .* 3 data-parallel devices .*fsdp=1"):
        setup.build(config, str(tmp_path))  # raised before any data or model is built
    assert not (tmp_path / "checkpoints").exists()
    checks.check_batch_split(tiny(data=2, fsdp=2), 8, 1)  # 4 groups over 2 x 2: fine
    with pytest.raises(ValueError, match=r"4 groups of a step do not split over the 8"):
        checks.check_batch_split(tiny(data=-1), 8, 1)  # -1: all 8 devices
    packed = tiny(data=2)
    packed.data.update(dict(layout="pairs", groups=3))
    with pytest.raises(ValueError, match=r"data.groups=3: the 3 groups .* 2 data-parallel"):
        checks.check_batch_split(packed, 8, 1)
    checks.check_batch_split(packed, 8, 2)  # 3 groups per process x 2 processes: 6 split
    cached = tiny(data=4)
    cached.reference.update(dict(mode="cached", batch_size=6))
    with pytest.raises(ValueError, match=r"reference.batch_size=6 .* 4 data-parallel"):
        checks.check_batch_split(cached, 8, 1)
    task = tiny(data=2, fsdp=3)
    task.batch_size = 6
    task.train.task_eval_prompts = 2
    with pytest.raises(ValueError, match=r"task evaluation scores 1024 rows .* 6 data-parallel"):
        checks.check_batch_split(task, 8, 1)
    with pytest.raises(ValueError, match=r"mesh.data=3, mesh.fsdp=-1, mesh.tensor=1 on 8"):
        checks.check_batch_split(tiny(data=3, fsdp=-1), 8, 1)
