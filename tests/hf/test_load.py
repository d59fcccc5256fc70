"""HF checkpoints -> mipo_jax: logits equal transformers' (float32, 1e-4) for every family.

Also the helpers the other model tests import: `tiny_torch_model` builds a tiny random
transformers model (all weights, norms and biases randomised so a wrong mapping shows).
"""

import json

import jax
import numpy as np
import pytest
import torch
import transformers

from mipo_jax.hf.load import load_pretrained
from mipo_jax.hf.mappings import TABLES
from mipo_jax.hf.safetensors import SafetensorsSource
from mipo_jax.models import ModelConfig

VOCAB = 256
_BASE = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)
_LLAMA3_ROPE = dict(
    rope_type="llama3",
    factor=8.0,
    low_freq_factor=1.0,
    high_freq_factor=4.0,
    original_max_position_embeddings=16,
    rope_theta=500000.0,
)
FAMILIES = {
    "llama3": lambda: transformers.LlamaForCausalLM(
        transformers.LlamaConfig(**_BASE, rope_parameters=_LLAMA3_ROPE)
    ),
    "llama_tied_bias": lambda: transformers.LlamaForCausalLM(
        transformers.LlamaConfig(
            **_BASE,
            tie_word_embeddings=True,
            attention_bias=True,
            mlp_bias=True,
            rope_parameters=dict(rope_type="linear", factor=2.0, rope_theta=10000.0),
        )
    ),
    "mistral": lambda: transformers.MistralForCausalLM(
        transformers.MistralConfig(**_BASE, sliding_window=5)
    ),
    "qwen2": lambda: transformers.Qwen2ForCausalLM(
        transformers.Qwen2Config(**_BASE, tie_word_embeddings=True)
    ),
    "qwen3": lambda: transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**_BASE, head_dim=32)),
    "gpt2": lambda: transformers.GPT2LMHeadModel(
        transformers.GPT2Config(
            vocab_size=VOCAB,
            n_embd=64,
            n_layer=2,
            n_head=4,
            n_positions=64,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=0,
        )  # fmt: skip
    ),
}


def randomise(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every parameter random (norm scales around 1), so a wrong mapping cannot hide."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            is_norm = "norm" in name or ".ln_" in name
            p.copy_(
                (1.0 if is_norm and name.endswith("weight") else 0.0) + 0.1 * torch.randn_like(p)
            )
    return model.eval()


def tiny_torch_model(family: str, seed: int = 0) -> torch.nn.Module:
    """A float32 transformers model of `family` with every parameter randomised."""
    torch.manual_seed(seed)
    return randomise(FAMILIES[family](), seed)


def save_tiny(family: str, folder, seed: int = 0) -> torch.nn.Module:
    model = tiny_torch_model(family, seed)
    model.save_pretrained(folder)
    return model


def torch_logits(model, tokens, attention_mask=None, position_ids=None) -> np.ndarray:
    as_t = lambda x: None if x is None else torch.tensor(np.asarray(x), dtype=torch.long)
    with torch.no_grad():
        out = model(
            as_t(tokens), attention_mask=as_t(attention_mask), position_ids=as_t(position_ids)
        )
    return out.logits.numpy()


def padded_batch(seed: int = 0):
    """Tokens [3, 12] with rows of length 12, 9 and 4; right- and left-padded masks."""
    rng = np.random.RandomState(seed)
    tokens = rng.randint(3, VOCAB, (3, 12))
    lengths = np.array([12, 9, 4])
    right = (np.arange(12)[None] < lengths[:, None]).astype(np.int32)
    left = right[:, ::-1].copy()
    return tokens, right, left


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def checkpoint(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    return request.param, folder, save_tiny(request.param, folder)


def test_logits_match_transformers_on_padded_batches(checkpoint):
    family, folder, torch_model = checkpoint
    model = load_pretrained(folder)
    forward = jax.jit(lambda t, p, s: model(t, p, s))
    tokens, right, left = padded_batch()
    for mask in (right, left):
        positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
        want = torch_logits(torch_model, tokens, mask, positions)
        got = np.asarray(forward(tokens, positions, mask))
        valid = mask.astype(bool)
        np.testing.assert_allclose(got[valid], want[valid], atol=1e-4, rtol=1e-4)
        assert np.isfinite(got).all()


def test_logits_default_positions_and_scan_choice(checkpoint):
    """positions=None / segment_ids=None mean arange / no padding; scan or loop alike."""
    family, folder, torch_model = checkpoint
    tokens, _, _ = padded_batch(1)
    want = torch_logits(torch_model, tokens)
    for scan in (True, False):
        model = load_pretrained(folder, scan_layers=scan)
        got = np.asarray(jax.jit(lambda t, m=model: m(t))(tokens))
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)


def test_config_parse(checkpoint):
    family, folder, torch_model = checkpoint
    cfg = ModelConfig.from_hf(SafetensorsSource(folder).config)
    hf = torch_model.config
    assert cfg.num_layers == 2 and cfg.vocab_size == VOCAB
    assert cfg.tie_embeddings == hf.tie_word_embeddings
    assert cfg.family in TABLES


def test_old_style_rope_keys_parse_like_new_ones():
    new = {**_BASE, "model_type": "llama", "rope_parameters": dict(_LLAMA3_ROPE)}
    old_scaling = {k: v for k, v in _LLAMA3_ROPE.items() if k != "rope_theta"}
    old = {**_BASE, "model_type": "llama", "rope_theta": 500000.0, "rope_scaling": old_scaling}
    assert ModelConfig.from_hf(new) == ModelConfig.from_hf(old)
    assert ModelConfig.from_hf(new).rope_scaling.kind == "llama3"


def test_sharded_index_folder_loads(tmp_path):
    """A folder with model.safetensors.index.json and several shard files."""
    torch_model = tiny_torch_model("llama3")
    torch_model.save_pretrained(tmp_path, max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    assert len(json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"])
    tokens, _, _ = padded_batch()
    model = load_pretrained(tmp_path)
    got = np.asarray(jax.jit(lambda t: model(t))(tokens))
    np.testing.assert_allclose(got, torch_logits(torch_model, tokens), atol=1e-4, rtol=1e-4)


def test_bfloat16_checkpoint_loads(tmp_path):
    torch_model = tiny_torch_model("qwen3").to(torch.bfloat16)
    torch_model.save_pretrained(tmp_path)
    source = SafetensorsSource(tmp_path)
    name = "model.embed_tokens.weight"
    assert source.get(name).dtype.name == "bfloat16"
    want = torch_model.model.embed_tokens.weight.detach().float().numpy()
    np.testing.assert_array_equal(source.get(name).astype(np.float32), want)
    model = load_pretrained(tmp_path)
    assert model.embed.embedding[...].dtype == np.float32


def test_all_layer_hidden_states_match_transformers(checkpoint):
    """``hidden(all_layers=True)`` is transformers' ``output_hidden_states=True`` (L+1 entries:
    embeddings, layer outputs, final-normed last), looped or scanned, padded rows; ``select``
    maps each entry inside the layer loop (here a gather of a few positions)."""
    family, folder, torch_model = checkpoint
    tokens, right, _ = padded_batch(2)
    positions = np.maximum(np.cumsum(right, axis=1) - 1, 0)
    as_t = lambda x: torch.tensor(np.asarray(x), dtype=torch.long)
    with torch.no_grad():
        out = torch_model(
            as_t(tokens),
            attention_mask=as_t(right),
            position_ids=as_t(positions),
            output_hidden_states=True,
        )
    want = np.stack([h.numpy() for h in out.hidden_states])
    assert want.shape[0] == torch_model.config.num_hidden_layers + 1
    valid = right.astype(bool)
    picks = np.array([[0, 3], [1, 8], [2, 2]])  # (row, position) pairs inside each row
    gather = lambda h: h[picks[:, 0], picks[:, 1]]
    for scan in (True, False):
        model = load_pretrained(folder, scan_layers=scan)
        every = jax.jit(lambda t, p, s, m=model: m.hidden(t, p, s, all_layers=True))
        got = np.asarray(every(tokens, positions, right))
        assert got.shape == want.shape
        np.testing.assert_allclose(got[:, valid], want[:, valid], atol=1e-4, rtol=1e-4)
        final = jax.jit(lambda t, p, s, m=model: m.hidden(t, p, s))(tokens, positions, right)
        np.testing.assert_allclose(got[-1], np.asarray(final), atol=1e-6, rtol=1e-6)
        picked = jax.jit(lambda t, p, s, m=model: m.hidden(t, p, s, all_layers=True, select=gather))
        np.testing.assert_allclose(
            np.asarray(picked(tokens, positions, right)),
            got[:, picks[:, 0], picks[:, 1]],
            atol=1e-6,
        )
