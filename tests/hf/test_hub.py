"""Hub model ids (``hf:org/name``) resolve through huggingface_hub as transformers does.

The cache is laid out as the hub's (``models--ORG--NAME/{blobs,refs,snapshots/<commit>}``,
snapshot files linking to blobs) and read under ``HF_HUB_OFFLINE=1``: nothing downloads.
Issue 11, item 6: ``model.init=hf:HuggingFaceTB/SmolLM2-135M-Instruct`` failed with
"config.json not found".
"""

import hashlib
import os
import shutil

import numpy as np
import pytest

from mipo_jax.data import tokenize_records
from mipo_jax.data.embedded import ASSETS, load_tokenizer
from mipo_jax.data.vocab import VocabularyError, check_vocab
from mipo_jax.hf.hub import HubModelNotFound, hub_commit, resolve_model
from mipo_jax.hf.load import load_pretrained
from mipo_jax.hf.safetensors import SafetensorsSource
from mipo_jax.models import ModelConfig
from tests.hf.test_load import save_tiny

REPO = "org/tiny"
COMMIT_A, COMMIT_B = "a" * 40, "b" * 40


def add_commit(cache, repo_id, commit, folder, refs=()):
    """Put ``folder``'s files into the cache as ``commit`` of ``repo_id`` (blobs + links)."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    (repo / "refs").mkdir(exist_ok=True)
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True)
    for f in sorted(folder.iterdir()):
        blob = hashlib.sha256(f.read_bytes()).hexdigest()
        shutil.copyfile(f, repo / "blobs" / blob)
        os.symlink(os.path.join("..", "..", "blobs", blob), snap / f.name)
    for ref in refs:
        (repo / "refs" / ref).write_text(commit)
    return snap


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Two tiny llama checkpoints (different weights), with chat_bpe's tokenizer files."""
    out = {}
    for seed in (0, 1):
        folder = tmp_path_factory.mktemp(f"tiny{seed}")
        save_tiny("llama3", folder, seed=seed)
        for f in (ASSETS / "tokenizers" / "chat_bpe").iterdir():
            shutil.copyfile(f, folder / f.name)
        out[seed] = folder
    return out


@pytest.fixture
def cache(tmp_path, monkeypatch, folders):
    from huggingface_hub import constants

    assert constants.is_offline_mode()  # tests/conftest.py: HF_HUB_OFFLINE=1
    root = tmp_path / "hub"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(root))
    add_commit(root, REPO, COMMIT_A, folders[0], refs=("main",))
    add_commit(root, REPO, COMMIT_B, folders[1], refs=("v2",))
    return root


def embedding(model) -> np.ndarray:
    return np.asarray(model.embed.embedding[...])


def test_hub_id_loads_from_the_cache_at_its_revision(cache, folders):
    want = {seed: embedding(load_pretrained(folders[seed])) for seed in (0, 1)}
    np.testing.assert_array_equal(embedding(load_pretrained(REPO)), want[0])  # main
    np.testing.assert_array_equal(embedding(load_pretrained(f"hf:{REPO}")), want[0])
    np.testing.assert_array_equal(embedding(load_pretrained(REPO, revision="v2")), want[1])
    np.testing.assert_array_equal(embedding(load_pretrained(REPO, revision=COMMIT_B)), want[1])
    folder = resolve_model(REPO, revision="v2")
    assert folder == cache / "models--org--tiny" / "snapshots" / COMMIT_B
    assert hub_commit(folder) == COMMIT_B and hub_commit(folders[0]) is None


def test_resolution_agrees_with_transformers(cache):
    """transformers' own resolver picks the same snapshot for each revision."""
    from transformers import AutoConfig
    from transformers.utils import cached_file

    for revision in (None, "main", "v2", COMMIT_B):
        ours = resolve_model(REPO, revision=revision)
        theirs = cached_file(REPO, "config.json", revision=revision)
        assert os.path.dirname(theirs) == str(ours)
    config = AutoConfig.from_pretrained(REPO, revision="v2")
    assert SafetensorsSource(resolve_model(REPO, revision="v2")).config["vocab_size"] == (
        config.vocab_size
    )


def test_sharded_checkpoint_resolves_its_shards(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    src = tmp_path / "sharded"
    model = save_tiny("llama3", src)
    model.save_pretrained(src, max_shard_size="100KB")  # replaces model.safetensors
    assert (src / "model.safetensors.index.json").is_file()
    add_commit(tmp_path / "hub", "org/sharded", COMMIT_A, src, refs=("main",))
    np.testing.assert_array_equal(
        embedding(load_pretrained("org/sharded")), embedding(load_pretrained(src))
    )


def test_tokenizer_by_hub_id(cache):
    tok = load_tokenizer(f"hf:{REPO}", revision="v2")
    assert tok.get_vocab() == load_tokenizer("chat_bpe").get_vocab()


def test_hub_errors_say_what_to_do(cache, tmp_path, folders):
    with pytest.raises(
        HubModelNotFound, match=r"HF_HUB_OFFLINE=1 forbids .*hf download org/absent"
    ):
        load_pretrained("hf:org/absent")
    with pytest.raises(HubModelNotFound, match=r"\(revision v9\).*--revision v9"):
        resolve_model(REPO, revision="v9")
    with pytest.raises(HubModelNotFound, match="no such model folder"):
        resolve_model(str(tmp_path / "nope"))
    with pytest.raises(HubModelNotFound, match="is a file"):
        resolve_model(str(folders[0] / "config.json"))
    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    shutil.copyfile(folders[0] / "config.json", no_weights / "config.json")
    add_commit(cache, "org/bin", COMMIT_A, no_weights, refs=("main",))
    with pytest.raises(HubModelNotFound, match=r"lacks \['model.safetensors'\]"):
        resolve_model("org/bin")


def test_an_hf_model_with_a_smaller_vocabulary_than_the_tokenizer_is_refused(cache):
    """Issue 12, item 2: what the trainer checks before the first step (`check_vocab`)."""
    tok = load_tokenizer(f"hf:{REPO}")  # chat_bpe: 1024 tokens; the model has 256
    data = tokenize_records(
        [{"prompt": "Name a colour.", "chosen": " Blue", "rejected": " Seven"}], tok
    )
    config = ModelConfig.from_hf(SafetensorsSource(resolve_model(REPO)).config)
    with pytest.raises(VocabularyError, match="has vocab_size=256, the tokenizer has 1024 tokens"):
        check_vocab(config, tok, data, name=f"model.init=hf:{REPO}")
