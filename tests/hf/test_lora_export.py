"""Export of a LoRA model: merged HF weights (equal to the adapted model's logits) and the
adapters alone in PEFT's format (loaded by ``peft`` onto the base in transformers)."""

import json

import jax
import numpy as np
import pytest
import transformers
from safetensors.numpy import load_file

from mipo_jax.hf.export import PEFT_CONFIG, PEFT_WEIGHTS, save_pretrained
from mipo_jax.hf.load import load_pretrained
from mipo_jax.hf.safetensors import SafetensorsSource
from mipo_jax.models import lora
from tests.hf.test_load import padded_batch, save_tiny, torch_logits
from tests.models.test_lora import randomise


def adapted_model(folder, targets=lora.TARGETS, seed=0):
    """The tiny HF checkpoint in ``folder`` with random rank-4 adapters (α = 8)."""
    model = load_pretrained(folder)
    adapted = lora.attach(model, lora.LoraSettings(4, 8.0, targets), jax.random.key(seed))
    randomise(model, adapted, seed=seed, scale=0.2)
    return model


def logits(model, tokens, mask=None):
    return np.asarray(jax.jit(lambda t, s: model(t, None, s))(tokens, mask))


@pytest.mark.parametrize("family,targets", [("llama3", lora.TARGETS), ("gpt2", ("q", "o", "up"))])
def test_merged_export_equals_adapted_logits(family, targets, tmp_path):
    save_tiny(family, tmp_path / "in", seed=2)
    model = adapted_model(tmp_path / "in", targets)
    save_pretrained(model, tmp_path / "out")
    assert lora.is_adapted(model)  # exporting does not change the model
    reloaded = load_pretrained(tmp_path / "out")
    assert not lora.is_adapted(reloaded)
    tokens, right, _ = padded_batch(1)
    want, got = logits(model, tokens, right), logits(reloaded, tokens, right)
    scale = np.abs(want).max()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * scale)  # float32
    base = logits(load_pretrained(tmp_path / "in"), tokens, right)
    assert np.abs(base - want).max() > 100 * 1e-5 * scale  # the adapters do change the logits
    names = sorted(SafetensorsSource(tmp_path / "out").keys())
    assert names == sorted(SafetensorsSource(tmp_path / "in").keys())
    assert (tmp_path / "out" / "adapter").exists() == (family != "gpt2")  # fused c_attn: none


def test_peft_format_names_and_shapes(tmp_path):
    save_tiny("llama3", tmp_path / "in")
    model = adapted_model(tmp_path / "in", ("q", "o", "down"))
    save_pretrained(model, tmp_path / "out")
    config = json.loads((tmp_path / "out" / "adapter" / PEFT_CONFIG).read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM"
    assert (config["r"], config["lora_alpha"]) == (4, 8.0)
    assert config["target_modules"] == ["down_proj", "o_proj", "q_proj"]
    tensors = load_file(tmp_path / "out" / "adapter" / PEFT_WEIGHTS)
    cfg = model.config
    layer = "base_model.model.model.layers.1."
    q_a = tensors[layer + "self_attn.q_proj.lora_A.weight"]
    assert q_a.shape == (4, cfg.hidden_size)
    np.testing.assert_array_equal(q_a, np.asarray(model.layers.attn.q.lora_a[...][1]).T)
    o_b = tensors[layer + "self_attn.o_proj.lora_B.weight"]
    assert o_b.shape == (cfg.hidden_size, 4)
    assert tensors[layer + "mlp.down_proj.lora_A.weight"].shape == (4, cfg.intermediate_size)
    assert len(tensors) == 2 * 3 * cfg.num_layers


def test_peft_loads_the_adapters_onto_the_base(tmp_path):
    """``PeftModel.from_pretrained(base, <export>/adapter)`` computes our adapted logits."""
    peft = pytest.importorskip("peft")
    torch_base = save_tiny("llama3", tmp_path / "in", seed=3)
    model = adapted_model(tmp_path / "in", seed=3)
    save_pretrained(model, tmp_path / "out")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "in").eval()
    peft_model = peft.PeftModel.from_pretrained(hf, str(tmp_path / "out" / "adapter")).eval()
    tokens, right, _ = padded_batch(2)
    got = torch_logits(peft_model, tokens, right)
    want = logits(model, tokens, right)
    valid = right.astype(bool)
    np.testing.assert_allclose(got[valid], want[valid], atol=1e-4, rtol=1e-4)
    base = torch_logits(torch_base.eval(), tokens, right)
    assert np.abs(base[valid] - want[valid]).max() > 1e-2  # PEFT did load the adapters
    # and PEFT's own merge equals our merged export
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    np.testing.assert_allclose(
        torch_logits(peft_model.merge_and_unload(), tokens, right)[valid],
        torch_logits(merged, tokens, right)[valid],
        atol=1e-4,
        rtol=1e-4,
    )
