"""GGUF files (llama.cpp) as a checkpoint source: Hugging Face names, PyTorch layout, float32.

`GGUFSource(path)` reads the header once and dequantises one tensor per `get(name)`, so
a loader can stream the file tensor by tensor. It undoes the two things llama.cpp's
converter (`convert_hf_to_gguf.py`) does to a Hugging Face checkpoint:

* renames tensors (`blk.3.attn_q.weight` -> `model.layers.3.self_attn.q_proj.weight`);
* for the `llama` architecture (Llama 1-3, Mistral 7B, SmolLM, ...), permutes the rows of
  `attn_q` and `attn_k` within each head from "halves" to "interleaved" rotary order.

Architectures: `llama`, `qwen2` (q/k/v bias), `qwen3` (q/k RMS norm). Tensor types, all
dequantised to float32 by `gguf.quants.dequantize`: F32, F16, BF16, Q4_0, Q4_1, Q5_0,
Q5_1, Q8_0 and the K-quants Q2_K, Q3_K, Q4_K, Q5_K, Q6_K. Anything else fails in the
constructor, naming the tensor and its type, so no model is ever half-loaded.
"""

from __future__ import annotations

import os
import re
from typing import Any

import numpy as np

SUPPORTED_TYPES = (
    "F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0",
    "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K",
)  # fmt: skip

# GGUF architecture -> (HF model_type, HF class, whether llama.cpp permuted q/k rows).
_ARCHS = {
    "llama": ("llama", "LlamaForCausalLM", True),
    "qwen2": ("qwen2", "Qwen2ForCausalLM", False),
    "qwen3": ("qwen3", "Qwen3ForCausalLM", False),
}
_TOP_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_BLOCK_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GGUF_NAME = re.compile(r"(?:blk\.(?P<layer>\d+)\.)?(?P<base>\w+)\.(?P<kind>weight|bias)")
_ROPE_FREQS = "rope_freqs.weight"  # llama3 RoPE scaling, stored as per-frequency divisors


class GGUFError(ValueError):
    """A GGUF file that cannot be read, or holds something this loader does not support."""


def hf_name(gguf_name: str) -> str | None:
    """The Hugging Face state-dict name of a GGUF tensor name, or None if unknown."""
    m = _GGUF_NAME.fullmatch(gguf_name)
    if m is None:
        return None
    if m["layer"] is None:
        base = _TOP_NAMES.get(m["base"])
    else:
        sub = _BLOCK_NAMES.get(m["base"])
        base = sub and f"model.layers.{m['layer']}.{sub}"
    return base and f"{base}.{m['kind']}"


def unpermute_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Inverse of llama.cpp's `LlamaModel.permute` on q/k rows (weights or biases).

    llama.cpp stores each head's rows as `reshape(n_heads, 2, d/2).swapaxes(1, 2)`: the
    rotary pairs (i, i + d/2) of Hugging Face's rotate_half become adjacent rows.
    """
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


class GGUFSource:
    """A checkpoint source over one GGUF file: `config`, `keys()`, `get(name)`.

    Args:
        path: a `.gguf` file (one file; split `-00001-of-0000N` files are not supported).
    """

    def __init__(self, path: str | os.PathLike[str]):
        import gguf

        self.path = os.fspath(path)
        try:
            self._reader = gguf.GGUFReader(self.path)
        except Exception as e:  # the reader raises bare ValueError/KeyError/IndexError
            raise GGUFError(
                f"{self.path}: not a readable GGUF file (truncated or corrupt?): "
                f"{type(e).__name__}: {e}"
            ) from e
        self.arch = self._field("general.architecture")
        if self.arch not in _ARCHS:
            raise GGUFError(
                f"{self.path}: unsupported GGUF architecture {self.arch!r}; "
                f"supported: {sorted(_ARCHS)}"
            )
        self._tensors = self._index_tensors()
        self.config = self._build_config()
        self._unpermute_heads = {}  # llama.cpp permuted q/k rows per head for llama only
        if _ARCHS[self.arch][2]:
            self._unpermute_heads = {
                "q_proj": self.config["num_attention_heads"],
                "k_proj": self.config["num_key_value_heads"],
            }

    def keys(self) -> list[str]:
        return list(self._tensors)

    def get(self, name: str) -> np.ndarray:
        """Dequantise one tensor to float32, in Hugging Face (PyTorch) layout."""
        import gguf

        t = self._tensors.get(name)
        if t is None:
            raise KeyError(f"{self.path}: no tensor {name!r} (has {len(self._tensors)} tensors)")
        w = gguf.quants.dequantize(t.data, t.tensor_type)
        if isinstance(w, np.memmap):  # F32 comes back as a read-only view of the file
            w = np.array(w)
        n_heads = self._unpermute_heads.get(name.split(".")[-2])
        return w if n_heads is None else unpermute_rows(w, n_heads)

    def shape(self, name: str) -> tuple[int, ...]:
        """The shape `get(name)` returns, without reading the data."""
        if name not in self._tensors:
            raise KeyError(f"{self.path}: no tensor {name!r} (has {len(self._tensors)} tensors)")
        return tuple(reversed(self._tensors[name].shape.tolist()))

    # ---- header parsing -------------------------------------------------------------

    def _field(self, key: str, default: Any = KeyError) -> Any:
        f = self._reader.fields.get(key)
        if f is None:
            if default is KeyError:
                raise GGUFError(f"{self.path}: GGUF metadata key {key!r} is missing")
            return default
        return f.contents()

    def _index_tensors(self) -> dict[str, Any]:
        tensors = {}
        for t in self._reader.tensors:
            kind = t.tensor_type.name
            if t.name == _ROPE_FREQS and self.arch == "llama":
                continue  # read into config["rope_scaling"]
            name = hf_name(t.name)
            if name is None:
                raise GGUFError(f"{self.path}: tensor {t.name!r} has no Hugging Face mapping")
            if kind not in SUPPORTED_TYPES:
                raise GGUFError(
                    f"{self.path}: tensor {t.name!r} has type {kind}, which cannot be "
                    f"dequantised; supported: {', '.join(SUPPORTED_TYPES)}"
                )
            tensors[name] = t
        return tensors

    def _build_config(self) -> dict[str, Any]:
        a = self.arch
        for needed in ("token_embd.weight", "blk.0.attn_q.weight"):
            if hf_name(needed) not in self._tensors:
                raise GGUFError(f"{self.path}: tensor {needed!r} is missing")
        model_type, cls, _ = _ARCHS[a]
        heads = int(self._field(f"{a}.attention.head_count"))
        q_rows = self.shape("model.layers.0.self_attn.q_proj.weight")[0]
        head_dim = int(self._field(f"{a}.attention.key_length", q_rows // heads))
        rope_dim = self._field(f"{a}.rope.dimension_count", head_dim)
        if rope_dim != head_dim or heads * head_dim != q_rows:
            raise GGUFError(
                f"{self.path}: {a}.rope.dimension_count={rope_dim}, head_dim={head_dim}, "
                f"heads={heads} and attn_q rows={q_rows} disagree (partial rotary unsupported)"
            )
        theta = _f32(self._field(f"{a}.rope.freq_base", 10000.0))
        config = {
            "model_type": model_type,
            "architectures": [cls],
            "vocab_size": self.shape("model.embed_tokens.weight")[0],
            "hidden_size": int(self._field(f"{a}.embedding_length")),
            "intermediate_size": int(self._field(f"{a}.feed_forward_length")),
            "num_hidden_layers": int(self._field(f"{a}.block_count")),
            "num_attention_heads": heads,
            "num_key_value_heads": int(self._field(f"{a}.attention.head_count_kv", heads)),
            "head_dim": head_dim,
            "hidden_act": "silu",
            "max_position_embeddings": int(self._field(f"{a}.context_length")),
            "rms_norm_eps": _f32(self._field(f"{a}.attention.layer_norm_rms_epsilon")),
            "rope_theta": theta,
            "rope_scaling": self._rope_scaling(theta, head_dim),
            "tie_word_embeddings": "lm_head.weight" not in self._tensors,
        }
        if model_type == "llama":
            config["attention_bias"] = "model.layers.0.self_attn.q_proj.bias" in self._tensors
            config["mlp_bias"] = False
        for key in ("bos", "eos", "padding"):
            token_id = self._field(f"tokenizer.ggml.{key}_token_id", None)
            if token_id is not None:
                config[f"{key.replace('padding', 'pad')}_token_id"] = int(token_id)
        return config

    def _rope_scaling(self, theta: float, head_dim: int) -> dict[str, Any] | None:
        a = self.arch
        kind = self._field(f"{a}.rope.scaling.type", "none")
        freqs = next((t for t in self._reader.tensors if t.name == _ROPE_FREQS), None)
        if freqs is not None and kind in ("none", "llama3"):
            divisors = np.array(freqs.data, np.float32)
            params = _llama3_scaling(divisors, theta, head_dim)
            if params is None:
                raise GGUFError(
                    f"{self.path}: tensor {_ROPE_FREQS!r} does not match llama3 RoPE scaling"
                )
            return params
        if kind == "none":
            return None
        if kind == "linear":
            return {"rope_type": "linear", "factor": _f32(self._field(f"{a}.rope.scaling.factor"))}
        raise GGUFError(f"{self.path}: {a}.rope.scaling.type={kind!r} is not supported")


def _f32(x: float) -> float:
    """A float32 metadata value as the shortest decimal that rounds to it (1e-05, not 9.99e-06)."""
    return float(np.format_float_positional(np.float32(x), unique=True, trim="-"))


def _llama3_scaling(divisors: np.ndarray, theta: float, head_dim: int) -> dict | None:
    """Llama 3.1's `rope_scaling` recovered from llama.cpp's `rope_freqs` tensor, or None.

    llama.cpp's converter stores, per frequency, the divisor that Llama 3's RoPE scaling
    applies. We take `factor = max(divisors)` and Meta's constants (low 1, high 4, original
    context 8192; shared by Llama 3.1, 3.2 and 3.3), recompute the divisors, and accept
    them only if they match.
    """
    params = {
        "factor": _f32(divisors.max()),
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    expected = llama3_rope_divisors(theta, head_dim, **params)
    if divisors.shape != expected.shape or not np.allclose(divisors, expected, rtol=1e-6, atol=0):
        return None
    return {"rope_type": "llama3", **params}


def llama3_rope_divisors(
    theta: float,
    head_dim: int,
    factor: float,
    low_freq_factor: float,
    high_freq_factor: float,
    original_max_position_embeddings: int,
) -> np.ndarray:
    """llama.cpp's `rope_freqs` values: the per-frequency divisor of Llama 3 RoPE scaling."""
    exponent = np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)
    freqs = (1.0 / np.float32(theta) ** exponent).astype(np.float64)  # float32, as llama.cpp
    wavelen = 2 * np.pi / freqs
    ctx = original_max_position_embeddings
    smooth = (ctx / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    mid = 1 / ((1 - smooth) / factor + smooth)
    out = np.where(wavelen < ctx / high_freq_factor, 1.0, mid)
    return np.where(wavelen > ctx / low_freq_factor, factor, out).astype(np.float32)


def tokenizer_from_gguf(path: str | os.PathLike[str]):
    """The tokenizer a GGUF file carries, with its chat template, as a transformers fast
    tokenizer. Offline: transformers converts the file's vocabulary and merges itself."""
    from transformers import AutoTokenizer

    path = os.path.abspath(os.fspath(path))
    if not os.path.isfile(path):
        raise FileNotFoundError(path)
    return AutoTokenizer.from_pretrained(
        os.path.dirname(path), gguf_file=os.path.basename(path), local_files_only=True
    )
