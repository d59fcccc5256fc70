"""mipo_jax -> HF folder: transformers' from_pretrained loads it and computes the same logits."""

import jax
import numpy as np
import pytest
import transformers

from mipo_jax.hf.export import save_pretrained
from mipo_jax.hf.load import load_pretrained, param_table
from mipo_jax.hf.safetensors import SafetensorsSource
from tests.hf.test_load import FAMILIES, padded_batch, save_tiny, torch_logits


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_export_reloads_in_transformers_with_equal_logits(family, tmp_path):
    save_tiny(family, tmp_path / "in", seed=1)
    model = load_pretrained(tmp_path / "in")
    save_pretrained(model, tmp_path / "out")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert type(reloaded).__name__ == model.config.to_hf()["architectures"][0]
    tokens, right, _ = padded_batch(2)
    want = np.asarray(jax.jit(lambda t, s: model(t, None, s))(tokens, right))
    got = torch_logits(reloaded, tokens, right)
    valid = right.astype(bool)
    np.testing.assert_allclose(got[valid], want[valid], atol=1e-4, rtol=1e-4)
    # Same tensor names as transformers writes, and our loader reads our export exactly.
    assert sorted(SafetensorsSource(tmp_path / "out").keys()) == sorted(
        SafetensorsSource(tmp_path / "in").keys()
    )
    again = param_table(load_pretrained(tmp_path / "out"))
    for path, var in param_table(model).items():
        np.testing.assert_array_equal(np.asarray(again[path][...]), np.asarray(var[...]))


def test_sharded_export_and_tokenizer(tmp_path):
    """Small max_shard_size gives an index plus shards; a tokenizer is saved alongside."""
    from tokenizers import Tokenizer, models

    save_tiny("qwen2", tmp_path / "in")
    model = load_pretrained(tmp_path / "in")
    vocab = {f"t{i}": i for i in range(256)}
    tok = transformers.PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="t0")), unk_token="t0"
    )
    save_pretrained(model, tmp_path / "out", tokenizer=tok, max_shard_size=20_000)
    assert (tmp_path / "out" / "model.safetensors.index.json").exists()
    assert len(list((tmp_path / "out").glob("model-*.safetensors"))) > 1
    assert transformers.AutoTokenizer.from_pretrained(tmp_path / "out").vocab_size == 256
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    tokens, _, _ = padded_batch(3)
    want = np.asarray(jax.jit(lambda t: model(t))(tokens))
    np.testing.assert_allclose(torch_logits(reloaded, tokens), want, atol=1e-4, rtol=1e-4)


def test_bfloat16_export(tmp_path):
    save_tiny("llama3", tmp_path / "in")
    model = load_pretrained(tmp_path / "in")
    save_pretrained(model, tmp_path / "out", dtype="bfloat16")
    source = SafetensorsSource(tmp_path / "out")
    assert source.get("model.embed_tokens.weight").dtype.name == "bfloat16"
    assert source.config["dtype"] == "bfloat16"
    reloaded = param_table(load_pretrained(tmp_path / "out"))
    want = np.asarray(model.embed.embedding[...])
    got = np.asarray(reloaded["embed.embedding"][...])
    np.testing.assert_allclose(got, want, rtol=2**-8, atol=0)


def test_exported_model_generates_the_same_text(tmp_path):
    """transformers' greedy generate on our export equals our greedy generate."""
    from mipo_jax.models.sampling import generate
    from tests.models.test_sampling import PROMPTS, _hf_greedy

    save_tiny("llama3", tmp_path / "in", seed=4)
    model = load_pretrained(tmp_path / "in")
    save_pretrained(model, tmp_path / "out")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    # EOS from the exported config.json on their side, from our config on ours.
    want = _hf_greedy(reloaded, PROMPTS, eos=None, max_new=10)
    got = np.asarray(generate(model, PROMPTS, max_new_tokens=10).tokens)
    np.testing.assert_array_equal(got[:, : want.shape[1]], want)
    assert (got[:, want.shape[1] :] == 0).all()
