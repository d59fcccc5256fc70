"""GGUFSource on GGUF files written here from tiny random transformers models.

Each file is written the way llama.cpp's `convert_hf_to_gguf.py` writes one: GGUF names
from gguf-py's own name table, llama's q/k rows permuted, 1-D norms in F32, matrices in
the type under test. Reading it back must give (i) the original weights within the
type's block-format error bound and (ii) exactly what transformers' own GGUF loader gives.
"""

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from gguf import GGMLQuantizationType as Q  # noqa: E402
from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint  # noqa: E402

from mipo_jax.hf.gguf import (  # noqa: E402
    SUPPORTED_TYPES,
    GGUFError,
    GGUFSource,
    llama3_rope_divisors,
)

F16_REL = 2.0**-11  # round-to-nearest float16: relative error <= half an ulp (10-bit mantissa)
F32_SLACK = 2.0**-20  # float32 arithmetic inside dequantisation (a few roundings of 2^-24)

# ---------------------------------------------------------------------------------------
# Writing GGUF files


def tiny_model(family="llama", tied=True, seed=0):
    """A random model whose matrices all have rows of a multiple of 256 (K-quant blocks)."""
    kw = dict(
        vocab_size=320,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        rms_norm_eps=1e-6,
        tie_word_embeddings=tied,
        bos_token_id=1,
        eos_token_id=2,
    )
    cls, cfg_cls = {
        "llama": (transformers.LlamaForCausalLM, transformers.LlamaConfig),
        "qwen2": (transformers.Qwen2ForCausalLM, transformers.Qwen2Config),
        "qwen3": (transformers.Qwen3ForCausalLM, transformers.Qwen3Config),
    }[family]
    if family == "qwen3":
        kw["head_dim"] = 64
    torch.manual_seed(seed)
    model = cls(cfg_cls(rope_theta=50000.0, **kw)).eval()
    with torch.no_grad():  # norms at init are all ones: make them distinguishable
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(0.1 * torch.randn_like(p))
    return model


def llama_cpp_permute(w, n_head, n_head_kv):
    """Copied from llama.cpp convert_hf_to_gguf.py, LlamaModel.permute."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def encode_q6_k(x):
    """Q6_K blocks for float32 rows (gguf-py can dequantise Q6_K but not quantise it).

    A block is 256 values in 16 groups of 16: value = d * scale[g] * (q - 32) with q in
    [0, 63], int8 scale[g] and one float16 d. We pick scale[g] * d >= amax_g / 31, so
    |x| / (d * scale[g]) <= 31 and q never clips.
    """
    blocks = x.astype(np.float64).reshape(-1, 256)
    group_step = np.abs(blocks.reshape(-1, 16, 16)).max(-1) / 31  # [n, 16]
    d = (group_step.max(-1, keepdims=True) / 127).astype(np.float16)
    low = d.astype(np.float64) * 127 < group_step.max(-1, keepdims=True)  # f16 rounded down
    d[low] = np.nextafter(d[low], np.float16(np.inf))
    d64 = d.astype(np.float64)
    scale = np.where(d64 > 0, np.ceil(group_step / np.where(d64 > 0, d64, 1)), 0)
    step = (d.astype(np.float32) * scale.astype(np.float32)).astype(np.float64)  # as dequant
    q = np.round(blocks.reshape(-1, 16, 16) / np.where(step > 0, step, 1)[..., None])
    q = (q.reshape(-1, 256) + 32).astype(np.uint8)
    low4, high2 = (q & 0xF).reshape(-1, 2, 2, 64), (q >> 4).reshape(-1, 2, 4, 32)
    ql = (low4[:, :, 0] | (low4[:, :, 1] << 4)).reshape(-1, 128)
    qh = sum(high2[:, :, s] << (2 * s) for s in range(4)).astype(np.uint8).reshape(-1, 64)
    scales = scale.astype(np.int8).view(np.uint8)
    out = np.concatenate([ql, qh, scales, d.view(np.uint8)], axis=1)
    return out.reshape(*x.shape[:-1], -1)


# Byte offsets of the float16 super-block scales (d, dmin) in each K-quant block.
K_SCALE_OFFSETS = {Q.Q2_K: (80, 82), Q.Q3_K: (108,), Q.Q4_K: (0, 2), Q.Q5_K: (0, 2)}


def encode(x, qtype, rng):
    """Bytes (or float array) for `x` in `qtype`. K-quants other than Q6_K get random
    bytes: gguf-py cannot quantise them, and the transformers comparison needs no bound."""
    if qtype == Q.F32:
        return x.astype(np.float32), None
    if qtype == Q.F16:
        return x.astype(np.float16), None
    if qtype == Q.Q6_K:
        return encode_q6_k(x), qtype
    if qtype in K_SCALE_OFFSETS:  # random blocks with finite float16 scales
        shape = gguf.quant_shape_to_byte_shape(x.shape, qtype)
        data = rng.integers(0, 256, shape, dtype=np.uint8)
        blocks = data.reshape(-1, gguf.GGML_QUANT_SIZES[qtype][1])
        for at in K_SCALE_OFFSETS[qtype]:
            scale = rng.uniform(1e-3, 1e-2, (len(blocks), 1)).astype(np.float16)
            blocks[:, at : at + 2] = scale.view(np.uint8)
        return data, qtype
    return gguf.quants.quantize(x.astype(np.float32), qtype), qtype


def write_gguf(path, model, qtype=Q.F32, arch="llama", extra_tensors=(), skip_keys=()):
    """Write `model` as llama.cpp would; returns {HF name: original float32 array}."""
    cfg = model.config
    w = gguf.GGUFWriter(str(path), arch)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    w.add_vocab_size(cfg.vocab_size)
    w.add_bos_token_id(cfg.bos_token_id)
    w.add_eos_token_id(cfg.eos_token_id)
    if arch == "llama":
        w.add_rope_dimension_count(cfg.head_dim)
    if arch == "qwen3":
        w.add_key_length(cfg.head_dim)
        w.add_value_length(cfg.head_dim)
    names_arch = arch if arch in ("qwen2", "qwen3") else "llama"  # llama names for bad archs
    arch_id = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == names_arch)
    names = gguf.get_tensor_name_map(arch_id, cfg.num_hidden_layers)
    rng = np.random.default_rng(0)
    originals = {}
    for key, t in model.state_dict().items():
        if (key == "lm_head.weight" and cfg.tie_word_embeddings) or key in skip_keys:
            continue
        x = originals[key] = t.float().numpy()
        base, kind = key.rsplit(".", 1)
        if arch == "llama" and ".q_proj." in key:
            x = llama_cpp_permute(x, cfg.num_attention_heads, cfg.num_attention_heads)
        if arch == "llama" and ".k_proj." in key:
            x = llama_cpp_permute(x, cfg.num_attention_heads, cfg.num_key_value_heads)
        data, raw = encode(x, qtype if x.ndim == 2 else Q.F32, rng)
        w.add_tensor(f"{names.get_name(base)}.{kind}", data, raw_dtype=raw)
    for name, data, raw in extra_tensors:
        w.add_tensor(name, data, raw_dtype=raw)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return originals


# ---------------------------------------------------------------------------------------
# Error bounds of each block format, per element, from the original values x


def error_bound(x, qtype):
    """Largest |dequant(quant(x)) - x| the block format allows, per element.

    d is a block's step, stored as float16 (relative error <= 2^-11, times at most the
    largest |q| it multiplies); m a block minimum stored as float16.
    * Q8_0 (32 values): d = amax/127, q = round(x/d)           -> d/2 + 127 d 2^-11
    * Q4_0 / Q5_0 (32):  d = -max/8 (-max/16), the signed extreme maps to -8 (-16), so
      the other side can reach +8 (+16) and clip to 7 (15)     -> d + 8 d 2^-11 (16 d 2^-11)
    * Q4_1 / Q5_1 (32):  d = (max-min)/15 (/31), q = round((x-min)/d) in [0, 15] ([0, 31])
                                                               -> d/2 + 15 d 2^-11 + |m| 2^-11
    * Q6_K (256 in groups g of 16), our encoder: step_g = d scale_g lies in
      [amax_g/31, amax_g/31 + d] and d <= (1 + 2^-10) max_g(amax_g/31)/127 (float16
      rounding, at worst rounded down and bumped one ulp up)   -> step_g / 2
    Every bound also allows float32 rounding in the dequantisation itself.
    """
    ax = np.abs(x)
    if qtype == Q.F32:
        return np.zeros_like(x)
    if qtype == Q.F16:
        return np.maximum(ax * F16_REL, 2.0**-25)  # 2^-25: half the subnormal spacing
    if qtype == Q.BF16:
        return ax * 2.0**-8  # round-to-nearest bfloat16, 7-bit mantissa
    if qtype == Q.Q6_K:
        groups = x.reshape(*x.shape[:-1], -1, 16, 16)  # [..., block, group, value]
        g = np.abs(groups).max(-1, keepdims=True) / 31
        d = g.max(axis=(-2, -1), keepdims=True) / 127 * (1 + 2.0**-10)
        per_group = (g + d) / 2
        bound = np.broadcast_to(per_group, groups.shape).reshape(x.shape)
    else:
        blocks = x.reshape(*x.shape[:-1], -1, 32)
        amax = np.abs(blocks).max(-1, keepdims=True)
        lo, hi = blocks.min(-1, keepdims=True), blocks.max(-1, keepdims=True)
        if qtype in (Q.Q8_0, Q.Q4_0, Q.Q5_0):
            qmax, clip = {Q.Q8_0: (127, 0.5), Q.Q4_0: (8, 1.0), Q.Q5_0: (16, 1.0)}[qtype]
            per_block = amax / qmax * (clip + qmax * F16_REL)
        else:
            levels = {Q.Q4_1: 15, Q.Q5_1: 31}[qtype]
            d = (hi - lo) / levels
            per_block = d * (0.5 + levels * F16_REL) + np.abs(lo) * F16_REL
        bound = np.broadcast_to(per_block, blocks.shape).reshape(x.shape)
    return bound + F32_SLACK * (ax + bound)


# ---------------------------------------------------------------------------------------
# Tests

BOUNDED = [Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q6_K]
ALL_TYPES = BOUNDED + [Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K]


def test_supported_types_are_the_tested_ones():
    assert sorted(SUPPORTED_TYPES) == sorted(t.name for t in ALL_TYPES)


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama", tied=False)


@pytest.mark.parametrize("qtype", BOUNDED, ids=lambda q: q.name)
def test_dequantised_weights_within_block_bound(tmp_path, llama, qtype):
    path = tmp_path / "m.gguf"
    originals = write_gguf(path, llama, qtype)
    src = GGUFSource(path)
    assert sorted(src.keys()) == sorted(originals)
    for name, x in originals.items():
        got = src.get(name)
        assert got.dtype == np.float32 and got.shape == x.shape, name
        if x.ndim == 1 or qtype == Q.F32:
            np.testing.assert_array_equal(got, x, err_msg=name)
            continue
        err, bound = np.abs(got - x), error_bound(x, qtype)
        worst = np.unravel_index(np.argmax(err - bound), x.shape)
        assert np.all(err <= bound), (name, qtype.name, worst, err[worst], bound[worst])
        # the bound is not vacuous: most of it is used somewhere
        assert err.max() > 0.25 * bound.max(), (name, err.max(), bound.max())


def _transformers_tensors(path, model):
    target = type(model)(model.config)
    return load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=target)["tensors"]


@pytest.mark.parametrize("qtype", ALL_TYPES, ids=lambda q: q.name)
def test_llama_equals_transformers_gguf_loader(tmp_path, llama, qtype):
    """Same names and bit-identical values, so our q/k un-permutation is transformers'."""
    path = tmp_path / "m.gguf"
    write_gguf(path, llama, qtype)
    src, ref = GGUFSource(path), _transformers_tensors(path, llama)
    assert sorted(src.keys()) == sorted(ref)
    for name, t in ref.items():
        np.testing.assert_array_equal(src.get(name), t.numpy(), err_msg=name)


@pytest.mark.parametrize("family", ["qwen2", "qwen3"])
def test_qwen_equals_original_and_transformers(tmp_path, family):
    model = tiny_model(family)
    path = tmp_path / "m.gguf"
    originals = write_gguf(path, model, Q.F32, arch=family)
    src, ref = GGUFSource(path), _transformers_tensors(path, model)
    assert sorted(src.keys()) == sorted(originals) == sorted(ref)
    for name, x in originals.items():
        np.testing.assert_array_equal(src.get(name), x, err_msg=name)
        np.testing.assert_array_equal(ref[name].numpy(), x, err_msg=name)
    assert_config_matches(src.config, model.config)


CONFIG_KEYS = [
    "model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
    "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings",
    "tie_word_embeddings", "bos_token_id", "eos_token_id", "hidden_act",
]  # fmt: skip


def hf_value(hf_config, key):
    if key == "head_dim" and hf_config.model_type == "qwen2":  # Qwen2Config has none
        return hf_config.hidden_size // hf_config.num_attention_heads
    return getattr(hf_config, key)


def assert_config_matches(ours: dict, hf_config):
    for key in CONFIG_KEYS:
        assert ours[key] == hf_value(hf_config, key), key
    assert ours["rms_norm_eps"] == hf_config.rms_norm_eps
    assert ours["rope_theta"] == hf_config.rope_parameters["rope_theta"]
    assert ours["architectures"] == [type_name(hf_config)]
    # and transformers builds an identical config from our dict
    rebuilt = transformers.AutoConfig.for_model(**ours)
    for key in CONFIG_KEYS:
        assert hf_value(rebuilt, key) == hf_value(hf_config, key), key
    assert rebuilt.rope_parameters == hf_config.rope_parameters


def type_name(hf_config):
    return {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}.get(
        hf_config.model_type, "Qwen3ForCausalLM"
    )


@pytest.mark.parametrize("tied", [True, False])
def test_llama_config(tmp_path, tied):
    model = tiny_model("llama", tied=tied)
    path = tmp_path / "m.gguf"
    write_gguf(path, model, Q.Q8_0)
    src = GGUFSource(path)
    assert_config_matches(src.config, model.config)
    assert src.config["rope_scaling"] is None and src.config["attention_bias"] is False
    assert ("lm_head.weight" in src.keys()) == (not tied)
    theirs = load_gguf_checkpoint(str(path))["config"]  # transformers' own reading
    for key in CONFIG_KEYS[1:]:
        assert src.config[key] == theirs.get(key, model.config.to_dict()[key]), key
    assert np.float32(src.config["rms_norm_eps"]) == np.float32(theirs["rms_norm_eps"])


def llama_cpp_rope_freqs(base, dim, factor, low_freq_factor, high_freq_factor, old_context_len):
    """Copied from llama.cpp convert_hf_to_gguf.py, LlamaModel.generate_extra_tensors."""
    import math

    freqs = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor
    rope_factors = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < high_freq_wavelen:
            rope_factors.append(1)
        elif wavelen > low_freq_wavelen:
            rope_factors.append(factor)
        else:
            smooth = (old_context_len / wavelen - low_freq_factor) / (
                high_freq_factor - low_freq_factor
            )
            rope_factors.append(1 / ((1 - smooth) / factor + smooth))
    return torch.tensor(rope_factors, dtype=torch.float32).numpy()


@pytest.mark.parametrize("factor", [8.0, 32.0])  # Llama 3.1 / Llama 3.2
def test_llama3_rope_scaling_from_rope_freqs(tmp_path, llama, factor):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    theta = llama.config.rope_parameters["rope_theta"]
    freqs = llama_cpp_rope_freqs(theta, 64, factor, 1.0, 4.0, 8192)
    np.testing.assert_allclose(llama3_rope_divisors(theta, 64, factor, 1.0, 4.0, 8192), freqs,
                               rtol=1e-6)  # fmt: skip
    path = tmp_path / "m.gguf"
    write_gguf(path, llama, extra_tensors=[("rope_freqs.weight", freqs, None)])
    src = GGUFSource(path)
    assert "rope_freqs.weight" not in src.keys() and len(src.keys()) == 21
    scaling = src.config["rope_scaling"]
    assert scaling == {
        "rope_type": "llama3",
        "factor": factor,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    # transformers' llama3 RoPE from our config divides the plain frequencies by rope_freqs
    hf = transformers.AutoConfig.for_model(**src.config)
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](hf, "cpu")
    plain = 1.0 / theta ** (np.arange(0, 64, 2) / 64)
    np.testing.assert_allclose(scaled.numpy(), plain / freqs, rtol=1e-5)


def test_unmatched_rope_freqs_is_an_error(tmp_path, llama):
    freqs = np.linspace(1, 8, 32, dtype=np.float32)
    path = tmp_path / "m.gguf"
    write_gguf(path, llama, extra_tensors=[("rope_freqs.weight", freqs, None)])
    with pytest.raises(GGUFError, match="rope_freqs.weight"):
        GGUFSource(path)


# ---- bad input --------------------------------------------------------------------------


def test_get_is_lazy_and_unknown_key_is_keyerror(tmp_path, llama):
    path = tmp_path / "m.gguf"
    write_gguf(path, llama, Q.Q4_0)
    src = GGUFSource(path)
    assert src.shape("model.layers.1.mlp.down_proj.weight") == (256, 512)
    with pytest.raises(KeyError, match="model.layers.9.mlp.up_proj.weight"):
        src.get("model.layers.9.mlp.up_proj.weight")


def test_truncated_and_garbage_files(tmp_path, llama):
    path = tmp_path / "m.gguf"
    write_gguf(path, llama, Q.Q8_0)
    data = path.read_bytes()
    for cut in (10, 2000, len(data) // 2, len(data) - 1):
        bad = tmp_path / f"cut{cut}.gguf"
        bad.write_bytes(data[:cut])
        with pytest.raises(GGUFError, match="not a readable GGUF file"):
            GGUFSource(bad)
    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(GGUFError, match="magic"):
        GGUFSource(garbage)
    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"")
    with pytest.raises(GGUFError):
        GGUFSource(empty)


def test_unsupported_type_names_tensor_and_type(tmp_path, llama):
    path = tmp_path / "m.gguf"
    down = "model.layers.1.mlp.down_proj.weight"
    tq = np.zeros(gguf.quant_shape_to_byte_shape((256, 512), Q.TQ1_0), np.uint8)
    write_gguf(path, llama, skip_keys=[down],
               extra_tensors=[("blk.1.ffn_down.weight", tq, Q.TQ1_0)])  # fmt: skip
    with pytest.raises(GGUFError, match=r"'blk\.1\.ffn_down\.weight' has type TQ1_0"):
        GGUFSource(path)


def test_unsupported_architecture(tmp_path, llama):
    path = tmp_path / "m.gguf"
    write_gguf(path, llama, arch="phi3")
    with pytest.raises(GGUFError, match="unsupported GGUF architecture 'phi3'"):
        GGUFSource(path)


def test_unknown_tensor_and_missing_key(tmp_path, llama):
    path = tmp_path / "m.gguf"
    extra = np.zeros((4, 256), np.float32)
    write_gguf(path, llama, extra_tensors=[("blk.0.ffn_gate_exps.weight", extra, None)])
    with pytest.raises(GGUFError, match="'blk.0.ffn_gate_exps.weight' has no Hugging Face"):
        GGUFSource(path)
    path2 = tmp_path / "m2.gguf"
    write_gguf(path2, llama, skip_keys=["model.embed_tokens.weight"])
    with pytest.raises(GGUFError, match="'token_embd.weight' is missing"):
        GGUFSource(path2)
