"""TIS-DPO's contrastive models built inside the run (`mipo_jax.train.token_weights`).

One module fixture trains π⁺ (DPO) and π⁻ (DPO on swapped pairs) from a random tiny
reference on the controlled task, 10 steps each, through the real trainer; the tests read
what they learned, the on-disk cache and the refusals.
"""

import os
import types

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from configs import tisdpo
from mipo_jax.data.tasks import sentiment
from mipo_jax.train import checks, modules, setup, stages
from mipo_jax.train import token_weights as tw
from mipo_jax.train.data import StepData


def tiny_config(tmp, **token_weights):
    config = tisdpo.get_config("tiny")
    config.mesh.data = 1
    config.batch_size = 32
    config.token_weights.update(dict(steps=10, learning_rate=3e-3, cache_dir=str(tmp)))
    config.token_weights.update(token_weights)
    return config


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    old = jax.config.values["jax_disable_most_optimizations"]
    jax.config.update("jax_disable_most_optimizations", True)
    config = tiny_config(tmp_path_factory.mktemp("tisdpo"))
    mesh = setup.mesh_of(config)
    sharding = NamedSharding(mesh, PartitionSpec(("data", "fsdp")))
    train = StepData(config, "train")
    ref = modules.build_policy(config.model, train.tokenizer, mesh, config.seed)
    stage = stages.contrastive_stage(config, None)  # trains both (the cache dir is new)
    weighter = tw.TokenWeighter(
        config, sharding, tw.load_contrastive(config, stage["folders"], mesh)
    )
    yield types.SimpleNamespace(
        config=config, mesh=mesh, sharding=sharding, train=train, ref=ref, weighter=weighter,
        stage=stage,
    )  # fmt: skip
    jax.config.update("jax_disable_most_optimizations", old)


def word_ids(tokenizer) -> dict[int, float]:
    vocab = tokenizer.get_vocab()
    return {vocab[w]: s for w, s in zip(sentiment.WORDS, sentiment.SENTIMENT, strict=True)}


def test_contrastive_models_find_the_rewarded_tokens(built):
    """The controlled task's reward is Σ_t s(y_t) (s = ±1 per word), so d_t should estimate
    the token's reward, the premise of TIS-DPO: on held-out pairs log π⁺ − log π⁻ is positive
    on positive words and negative on negative ones, and after the signed rank transform the
    positive words of chosen responses outweigh its negative words, and the negative words of
    rejected responses outweigh its positive ones (measured: 1.03 vs 0.83, 1.12 vs 0.88)."""
    assert built.stage["trained"] == ["positive", "negative"]
    test = StepData(built.config, "eval", tokenizer=built.train.tokenizer)
    ids = word_ids(built.train.tokenizer)
    raw = {1.0: [], -1.0: []}
    weights = {(side, s): [] for side in (0, 1) for s in (1.0, -1.0)}
    for _ in range(4):  # 128 held-out pairs
        batch = built.weighter(next(test))
        d, w = built.weighter.scores(batch), batch["token_weights"]
        for tok, s in ids.items():
            for side in (0, 1):
                on = (batch["targets"][..., side, :] == tok) & (batch["mask"][..., side, :] > 0)
                sign = 1.0 if side == 0 else -1.0  # rejected scores are negated
                raw[s].extend(sign * d[..., side, :][on])
                weights[side, s].extend(w[..., side, :][on])
    assert np.mean(raw[1.0]) > 1.0 and np.mean(raw[-1.0]) < -1.0, {
        k: np.mean(v) for k, v in raw.items()
    }
    mean = {k: float(np.mean(v)) for k, v in weights.items()}
    assert mean[0, 1.0] > mean[0, -1.0] + 0.1, mean  # chosen: the good words weigh more
    assert mean[1, -1.0] > mean[1, 1.0] + 0.1, mean  # rejected: the bad words weigh more


def test_second_build_reuses_the_cached_models(built):
    first = built.weighter.contrastive
    stage = stages.contrastive_stage(built.config, None)
    assert stage["trained"] == [] and stage["key"] == built.stage["key"]
    assert stage["folders"] == first.folders
    again = tw.load_contrastive(built.config, stage["folders"], built.mesh)
    for a, b in ((first.positive, again.positive), (first.negative, again.negative)):
        for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params), strict=True):
            np.testing.assert_array_equal(x, y)
    for folder in first.folders:  # the finished runs keep their export, not their optimiser
        assert os.path.isfile(os.path.join(folder, "config.json"))
        assert not os.path.exists(os.path.join(os.path.dirname(folder), "checkpoints"))


def test_cache_key_follows_reference_data_and_settings(built, tmp_path):
    key = lambda config, ref=built.ref, train=built.train: tw.contrastive_runs(config, ref, train)[
        0
    ]
    base = key(built.config)
    assert key(tiny_config(built.config.token_weights.cache_dir)) == base
    quiet = tiny_config(tmp_path)
    quiet.train.progress, quiet.checkpoint.every = False, 7  # no effect on the models
    assert key(quiet) == base
    other_ref = modules.build_policy(built.config.model, built.train.tokenizer, built.mesh, 1)
    assert key(built.config, ref=other_ref) != base
    cut = tiny_config(tmp_path)
    cut.data.max_prompt_length = 3  # other tokenised data (prompts are 4-6 tokens)
    assert key(cut, train=StepData(cut, "train", tokenizer=built.train.tokenizer)) != base
    for change in (dict(learning_rate=1e-3), dict(steps=11), dict(source="sft")):
        assert key(tiny_config(tmp_path, **change)) != base, change


def test_negative_run_trains_on_swapped_pairs(built):
    positive, negative = tw.contrastive_runs(built.config, built.ref, built.train)[1]
    assert positive.loss.prior.name == negative.loss.prior.name == "reference"
    assert negative.loss.alpha == built.config.loss.alpha
    a = StepData(positive, "train", tokenizer=built.train.tokenizer).data
    b = StepData(negative, "train", tokenizer=built.train.tokenizer).data
    for x, y in ((a.completions[0], b.completions[1]), (a.completions[1], b.completions[0])):
        np.testing.assert_array_equal(x.values, y.values)
    sft = tw.contrastive_config(tiny_config(built.config.token_weights.cache_dir, source="sft"),
                                "negative", 5)  # fmt: skip
    assert sft.objective == "sft"  # the trainer's SFT: token-mean NLL of the chosen column
    assert dict(sft.data.columns) == {"chosen": "rejected", "rejected": "chosen"}
    assert sft.train.num_steps == 5 and "token_weights" not in sft


def test_identical_contrastive_models_are_refused(built, tmp_path):
    folder = built.weighter.contrastive.folders[0]
    same = tiny_config(tmp_path, source="folders", positive=folder, negative=folder)
    weighter = tw.TokenWeighter(
        same, built.sharding, tw.load_contrastive(same, (folder,) * 2, built.mesh)
    )
    with pytest.raises(ValueError, match="d ≡ 0"):
        weighter(next(built.train))
    empty = tiny_config(tmp_path, source="folders")
    with pytest.raises(ValueError, match="token_weights.positive and .negative"):
        checks.validate(empty)
    binary = tiny_config(tmp_path, source="folders", transform="binary")  # DPO, on purpose
    checks.validate(binary)
    ones = tw.TokenWeighter(binary, built.sharding, None)
    batch = ones(next(built.train))
    np.testing.assert_array_equal(batch["token_weights"], batch["mask"])
