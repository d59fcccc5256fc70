"""Bad checkpoints fail before a model exists, with an error naming the tensor or config key."""

import json

import numpy as np
import pytest

from mipo_jax.hf.export import write_safetensors
from mipo_jax.hf.load import CheckpointError, load_pretrained
from mipo_jax.hf.safetensors import SafetensorsSource
from mipo_jax.models import ModelConfig, UnsupportedConfigError
from tests.hf.test_load import save_tiny

Q = "model.layers.1.self_attn.q_proj.weight"


class DictSource:
    """An in-memory `CheckpointSource` (no `shape()`, so shapes are checked while streaming)."""

    def __init__(self, config, tensors):
        self.config, self.tensors = config, tensors

    def keys(self):
        return list(self.tensors)

    def get(self, name):
        return self.tensors[name]


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    folder = tmp_path_factory.mktemp("llama")
    save_tiny("llama3", folder)
    source = SafetensorsSource(folder)
    return source.config, {k: source.get(k) for k in source.keys()}


def _folder(tmp_path, config, tensors):
    (tmp_path / "config.json").write_text(json.dumps(config))
    write_safetensors(tmp_path / "model.safetensors", tensors)
    return tmp_path


def test_in_memory_source_loads(llama):
    config, tensors = llama
    model = load_pretrained(DictSource(config, tensors))
    np.testing.assert_array_equal(
        np.asarray(model.embed.embedding[...]), tensors["model.embed_tokens.weight"]
    )


def test_missing_tensor(llama, tmp_path):
    config, tensors = llama
    tensors = {k: v for k, v in tensors.items() if k != Q}
    with pytest.raises(CheckpointError, match=f"missing tensor '{Q}'"):
        load_pretrained(_folder(tmp_path, config, tensors))


def test_extra_tensor(llama, tmp_path):
    config, tensors = llama
    extra = "model.layers.2.self_attn.q_proj.weight"
    tensors = {**tensors, extra: tensors[Q]}
    with pytest.raises(CheckpointError, match=f"unexpected tensor '{extra}'"):
        load_pretrained(_folder(tmp_path, config, tensors))


@pytest.mark.parametrize("in_memory", [False, True])
def test_wrong_shape(llama, tmp_path, in_memory):
    config, tensors = llama
    k = "model.layers.1.self_attn.k_proj.weight"  # [kv_heads * head_dim, hidden] = [32, 64]
    tensors = {**tensors, k: np.ascontiguousarray(tensors[k].T)}
    source = DictSource(config, tensors) if in_memory else _folder(tmp_path, config, tensors)
    with pytest.raises(CheckpointError, match=rf"'{k}' has shape \(64, 32\), expected \(32, 64\)"):
        load_pretrained(source)


def test_bias_tensors_without_config_flag_are_unexpected(llama, tmp_path):
    config, tensors = llama
    bias = "model.layers.0.self_attn.q_proj.bias"
    tensors = {**tensors, bias: np.zeros(64, np.float32)}
    with pytest.raises(CheckpointError, match=f"unexpected tensor '{bias}'"):
        load_pretrained(_folder(tmp_path, config, tensors))


@pytest.mark.parametrize(
    "change, message",
    [
        ({"model_type": "falcon"}, "unsupported model_type='falcon'"),
        ({"architectures": ["LlamaForSequenceClassification"]}, "LlamaForSequenceClassification"),
        ({"foo_bar": 3}, "unsupported config key 'foo_bar'"),
        ({"hidden_act": "swiglu_custom"}, "'hidden_act'='swiglu_custom'"),
        ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0}}, "rope_type='yarn'"),
        ({"rope_parameters": {"rope_type": "default", "beta_fast": 1}}, "'beta_fast'"),
        ({"partial_rotary_factor": 0.5}, "'partial_rotary_factor'"),
        ({"use_sliding_window": True}, "'use_sliding_window'"),
        ({"layer_types": ["sliding_attention", "full_attention"]}, "'layer_types'"),
        ({"quantization_config": {"quant_method": "gptq"}}, "'quantization_config'"),
        ({"num_key_value_heads": 3}, "num_key_value_heads=3"),
        ({"num_attention_heads": 0}, "'num_attention_heads'=0: expected an integer >= 1"),
        ({"num_key_value_heads": 0}, "num_kv_heads=0: every model size must be an integer"),
        ({"hidden_size": -64}, "hidden_size=-64: every model size"),
        ({"num_hidden_layers": 0}, "num_layers=0: every model size"),
        ({"vocab_size": 0}, "vocab_size=0: every model size"),
        ({"head_dim": 0}, "head_dim=0: every model size"),
        ({"intermediate_size": 2.5}, "intermediate_size=2.5: every model size"),
    ],
)
def test_unsupported_config(llama, tmp_path, change, message):
    config, tensors = llama
    bad = {**config, **change}
    with pytest.raises(UnsupportedConfigError, match=message.replace("[", r"\[")):
        ModelConfig.from_hf(bad)
    with pytest.raises(UnsupportedConfigError, match=message.replace("[", r"\[")):
        load_pretrained(_folder(tmp_path, bad, tensors))


def test_gpt2_unsupported_keys():
    base = {"model_type": "gpt2", "n_embd": 64, "n_head": 4, "n_layer": 2, "vocab_size": 128}
    assert ModelConfig.from_hf(base).activation == "gelu_new"
    with pytest.raises(UnsupportedConfigError, match="'scale_attn_by_inverse_layer_idx'"):
        ModelConfig.from_hf({**base, "scale_attn_by_inverse_layer_idx": True})
    with pytest.raises(UnsupportedConfigError, match="'add_cross_attention'"):
        ModelConfig.from_hf({**base, "add_cross_attention": True})
    with pytest.raises(UnsupportedConfigError, match="'n_head'=0: expected an integer >= 1"):
        ModelConfig.from_hf({**base, "n_head": 0})


def test_gpt2_legacy_names_and_buffers_load(tmp_path):
    """Old GPT-2 checkpoints: no 'transformer.' prefix, and saved attn.bias mask buffers."""
    save_tiny("gpt2", tmp_path / "new")
    source = SafetensorsSource(tmp_path / "new")
    tensors = {k.removeprefix("transformer."): source.get(k) for k in source.keys()}
    tensors["h.0.attn.bias"] = np.tril(np.ones((1, 1, 64, 64), np.float32))
    model = load_pretrained(_folder(tmp_path, source.config, tensors))
    np.testing.assert_array_equal(
        np.asarray(model.pos_embed.embedding[...]), source.get("transformer.wpe.weight")
    )
