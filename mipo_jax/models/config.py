"""`ModelConfig`: one frozen dataclass for every decoder family, read from an HF config.json.

`ModelConfig.from_hf(d)` accepts the `config.json` of a supported family and refuses, with an
`UnsupportedConfigError` naming the key, anything that would make our forward pass differ
from transformers': an unknown architecture, an unsupported RoPE scaling, a key this module
does not know. Keys that cannot change the forward pass (token ids, generation defaults,
dropout rates: our models are deterministic and never apply dropout) are accepted and ignored.

Runtime policy (not part of the checkpoint) is given as keyword overrides:
``ModelConfig.from_hf(d, compute_dtype="bfloat16", remat="dots_saveable", scan_layers=True)``.
"""

import dataclasses
from typing import Any

FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gpt2")
ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "gpt2": "GPT2LMHeadModel",
}
ACTIVATIONS = ("silu", "gelu_new", "gelu_pytorch_tanh", "gelu", "relu")
REMAT_POLICIES = ("none", "full", "dots_saveable", "dots_with_no_batch_dims_saveable")
DTYPES = ("float32", "bfloat16", "float16")
ATTENTION_IMPLS = ("blocked", "flash", "cudnn", "splash", "auto")
MLP_IMPLS = ("autodiff", "custom_vjp")

# Keys with no effect on the forward pass (PretrainedConfig bookkeeping, token ids,
# generation defaults, initialisation, dropout).
_HARMLESS = frozenset(
    """_name_or_path architectures chunk_size_feed_forward dtype torch_dtype id2label label2id
    is_encoder_decoder is_decoder model_type output_attentions output_hidden_states problem_type
    return_dict use_return_dict torchscript transformers_version use_cache initializer_range
    bos_token_id eos_token_id pad_token_id sep_token_id decoder_start_token_id tokenizer_class
    prefix task_specific_params finetuning_task pruned_heads tie_encoder_decoder tf_legacy_loss
    use_bfloat16 cross_attention_hidden_size max_length min_length do_sample early_stopping
    num_beams num_beam_groups diversity_penalty temperature top_k top_p typical_p
    repetition_penalty length_penalty no_repeat_ngram_size encoder_no_repeat_ngram_size
    bad_words_ids num_return_sequences output_scores return_dict_in_generate
    forced_bos_token_id forced_eos_token_id remove_invalid_values exponential_decay_length_penalty
    suppress_tokens begin_suppress_tokens attention_dropout pretraining_tp
    max_position_embeddings""".split()
)
_GPT2_HARMLESS = frozenset(
    """resid_pdrop embd_pdrop attn_pdrop summary_type summary_use_proj summary_activation
    summary_proj_to_labels summary_first_dropout reorder_and_upcast_attn n_ctx""".split()
)
_ROPE_KEYS = frozenset(
    """rope_type type rope_theta factor low_freq_factor high_freq_factor
    original_max_position_embeddings partial_rotary_factor""".split()
)


class UnsupportedConfigError(ValueError):
    """An HF config (or checkpoint) that mipo_jax cannot reproduce exactly."""


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling: 'linear' (positions / factor) or 'llama3' (Llama 3.1)."""

    kind: str
    factor: float
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture (from the checkpoint) plus runtime policy (ours). Shape letters: see types.

    Attributes:
      family: one of `FAMILIES`; picks the HF name table and the config.json writer.
      norm: 'rms' (scale only) or 'layer' (scale and bias).
      mlp: 'gated' (down(act(gate x) * up x)) or 'plain' (down(act(up x)), with biases).
      position: 'rope' or 'learned' (GPT-2's wpe table of `max_position_embeddings` rows).
      qkv_bias / o_bias / mlp_bias: biases on q,k,v / the output projection / the MLP.
      qk_norm: RMSNorm over head_dim on q and k before RoPE (Qwen3).
      sliding_window: a query sees keys whose position is less than this many behind it.
      param_dtype / compute_dtype: storage and matmul dtypes (norms, softmax and RoPE run
        in float32 regardless).
      remat: one of `REMAT_POLICIES`, applied to each decoder layer.
      scan_layers: `jax.lax.scan` over the stacked layers (else a Python loop over them).
      attention_block: queries per attention block in full-sequence (training, scoring)
        passes; each block reads only the keys up to its last query (and within the
        caller's ``span``). 0 = one block. Decoding with a KV cache is never blocked.
        The flash implementation uses it for query and key blocks alike.
      attention_impl: one of `ATTENTION_IMPLS` (see `mipo_jax.models.attention`): 'blocked'
        (dense mask, memory ~T²), 'flash' (pure JAX, custom VJP, memory linear in T),
        'cudnn' / 'splash' (GPU / TPU kernels, falling back to 'flash' where the mask is
        not theirs), 'auto' (by backend).
      mlp_impl: one of `MLP_IMPLS`: 'custom_vjp' runs the gated MLP through
        `layers.gated_mlp` (saves the input and both pre-activations, recomputes the rest;
        no biases), 'autodiff' differentiates the plain code.
    """

    family: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int = 2048
    norm: str = "rms"
    norm_eps: float = 1e-6
    mlp: str = "gated"
    activation: str = "silu"
    position: str = "rope"
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    sliding_window: int | None = None
    tie_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    pad_token_id: int | None = None
    param_dtype: str = "float32"
    compute_dtype: str = "float32"
    remat: str = "none"
    scan_layers: bool = True
    attention_block: int = 128
    attention_impl: str = "blocked"
    mlp_impl: str = "autodiff"

    def __post_init__(self):
        _check_choice("family", self.family, FAMILIES)
        _check_choice("activation", self.activation, ACTIVATIONS)
        _check_choice("remat", self.remat, REMAT_POLICIES)
        _check_choice("param_dtype", self.param_dtype, DTYPES)
        _check_choice("compute_dtype", self.compute_dtype, DTYPES)
        _check_choice("attention_impl", self.attention_impl, ATTENTION_IMPLS)
        _check_choice("mlp_impl", self.mlp_impl, MLP_IMPLS)
        if self.attention_block < 0:
            raise ValueError(f"attention_block={self.attention_block} must be >= 0 (0 = one block)")
        _check_sizes(self)
        if self.num_heads % self.num_kv_heads:
            raise UnsupportedConfigError(
                f"num_attention_heads={self.num_heads} is not a multiple of "
                f"num_key_value_heads={self.num_kv_heads}"
            )

    @property
    def eos_ids(self) -> tuple[int, ...]:
        eos = self.eos_token_id
        return () if eos is None else (eos,) if isinstance(eos, int) else tuple(eos)

    @classmethod
    def from_hf(cls, hf: dict[str, Any], **policy: Any) -> "ModelConfig":
        """Parse an HF config.json dict; `policy` overrides runtime fields (dtypes, remat...)."""
        model_type = hf.get("model_type")
        if model_type not in FAMILIES:
            arch = hf.get("architectures")
            raise UnsupportedConfigError(
                f"unsupported model_type={model_type!r} (architectures={arch}); "
                f"supported: {', '.join(FAMILIES)}"
            )
        _check_architectures(hf, model_type)
        parse = _from_gpt2 if model_type == "gpt2" else _from_llama_like
        fields, used = parse(hf, model_type)
        _check_unknown_keys(hf, used, model_type)
        tokens = {k: _token_id(hf.get(k), k) for k in ("bos_token_id", "pad_token_id")}
        eos = hf.get("eos_token_id")
        tokens["eos_token_id"] = (
            tuple(eos) if isinstance(eos, list) else _token_id(eos, "eos_token_id")
        )
        return cls(family=model_type, **fields, **tokens, **policy)

    def to_hf(self) -> dict[str, Any]:
        """The config.json that transformers reads back as the same architecture."""
        to = _to_gpt2 if self.family == "gpt2" else _to_llama_like
        d = {"architectures": [ARCHITECTURES[self.family]], "model_type": self.family, **to(self)}
        eos = self.eos_token_id
        d.update(
            bos_token_id=self.bos_token_id,
            eos_token_id=list(eos) if isinstance(eos, tuple) else eos,
            pad_token_id=self.pad_token_id,
            tie_word_embeddings=self.tie_embeddings,
            dtype="float32",
        )
        return d


SIZES = ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
         "num_kv_heads", "head_dim", "max_position_embeddings")  # fmt: skip


def _check_sizes(c: "ModelConfig") -> None:
    """Every size a positive integer (a config.json with 0 or -1 would fail deep in JAX)."""
    for name in SIZES:
        value = getattr(c, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise UnsupportedConfigError(
                f"{name}={value!r}: every model size must be an integer >= 1"
            )


def _check_choice(name: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise UnsupportedConfigError(f"{name}={value!r} is not supported; choose from {allowed}")


def _token_id(value: Any, key: str) -> int | None:
    if value is None or isinstance(value, int):
        return value
    raise UnsupportedConfigError(f"config key {key!r}={value!r}: expected an integer or null")


def _check_architectures(hf: dict, model_type: str) -> None:
    archs = hf.get("architectures") or [ARCHITECTURES[model_type]]
    for arch in archs:
        if arch != ARCHITECTURES[model_type]:
            raise UnsupportedConfigError(
                f"unsupported architecture {arch!r} for model_type={model_type!r}; "
                f"supported: {ARCHITECTURES[model_type]!r}"
            )


def _check_unknown_keys(hf: dict, used: set[str], model_type: str) -> None:
    harmless = _HARMLESS | (_GPT2_HARMLESS if model_type == "gpt2" else frozenset())
    for key in sorted(hf):
        if key not in used and key not in harmless:
            raise UnsupportedConfigError(
                f"unsupported config key {key!r}={hf[key]!r} for model_type={model_type!r}: "
                "mipo_jax does not know whether it changes the model"
            )


def _require(hf: dict, key: str, expected: Any, default: Any = None) -> None:
    value = hf.get(key, default)
    if value != expected:
        raise UnsupportedConfigError(
            f"unsupported config key {key!r}={value!r}; only {expected!r} is supported"
        )


def _activation(hf: dict, key: str, default: str) -> str:
    act = hf.get(key) or default
    if act not in ACTIVATIONS:
        raise UnsupportedConfigError(f"unsupported config key {key!r}={act!r}; use {ACTIVATIONS}")
    return act


_LLAMA_KEYS = """vocab_size hidden_size intermediate_size num_hidden_layers num_attention_heads
    num_key_value_heads head_dim hidden_act rms_norm_eps rope_theta rope_scaling rope_parameters
    partial_rotary_factor tie_word_embeddings attention_bias mlp_bias sliding_window
    use_sliding_window max_window_layers layer_types""".split()


def _size(hf: dict, key: str, default: Any = None) -> Any:
    """A size the parser divides by: checked before use (other sizes: `_check_sizes`)."""
    value = hf.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UnsupportedConfigError(f"config key {key!r}={value!r}: expected an integer >= 1")
    return value


def _from_llama_like(hf: dict, family: str) -> tuple[dict, set[str]]:
    heads = _size(hf, "num_attention_heads")
    head_dim = hf.get("head_dim")
    head_dim = hf["hidden_size"] // heads if head_dim is None else head_dim
    kv_heads = hf.get("num_key_value_heads")
    attention_bias = bool(hf.get("attention_bias", False))
    if family != "llama":
        _require(hf, "mlp_bias", False, False)
    _require(hf, "use_sliding_window", False, False)
    layer_types = hf.get("layer_types") or []
    if any(t != "full_attention" for t in layer_types):
        raise UnsupportedConfigError(f"unsupported config key 'layer_types'={layer_types}")
    if family == "llama":
        _require(hf, "sliding_window", None)
    window = hf.get("sliding_window") if family == "mistral" else None
    theta, scaling = _rope(hf)
    fields = dict(
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"],
        num_layers=hf["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=heads if kv_heads is None else kv_heads,
        head_dim=head_dim,
        max_position_embeddings=hf.get("max_position_embeddings", 2048),
        norm_eps=hf.get("rms_norm_eps", 1e-6),
        activation=_activation(hf, "hidden_act", "silu"),
        rope_theta=theta,
        rope_scaling=scaling,
        qkv_bias=attention_bias or family == "qwen2",
        o_bias=attention_bias and family != "qwen2",
        mlp_bias=bool(hf.get("mlp_bias", False)),
        qk_norm=family == "qwen3",
        sliding_window=window,
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
    )
    return fields, set(_LLAMA_KEYS)


def _rope(hf: dict) -> tuple[float, RopeScaling | None]:
    params = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    bad = sorted(k for k in params if k not in _ROPE_KEYS)
    if bad:
        raise UnsupportedConfigError(f"unsupported rope parameter {bad[0]!r} in {params}")
    theta = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
    partial = params.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
    if partial != 1.0:
        raise UnsupportedConfigError(f"unsupported config key 'partial_rotary_factor'={partial}")
    kind = params.get("rope_type", params.get("type", "default"))
    if kind == "default":
        return theta, None
    if kind == "linear":
        return theta, RopeScaling("linear", float(params["factor"]))
    if kind == "llama3":
        original = params.get("original_max_position_embeddings")
        original = original or hf.get("max_position_embeddings", 8192)
        return theta, RopeScaling(
            "llama3",
            float(params["factor"]),
            float(params["low_freq_factor"]),
            float(params["high_freq_factor"]),
            int(original),
        )
    raise UnsupportedConfigError(
        f"unsupported rope_type={kind!r} (config key 'rope_parameters'/'rope_scaling'); "
        "supported: default, linear, llama3"
    )


def _to_llama_like(c: ModelConfig) -> dict[str, Any]:
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": c.rope_theta}
    if c.rope_scaling is not None:
        s = c.rope_scaling
        rope.update(rope_type=s.kind, factor=s.factor)
        if s.kind == "llama3":
            rope.update(
                low_freq_factor=s.low_freq_factor,
                high_freq_factor=s.high_freq_factor,
                original_max_position_embeddings=s.original_max_position_embeddings,
            )
    d = dict(
        vocab_size=c.vocab_size,
        hidden_size=c.hidden_size,
        intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_layers,
        num_attention_heads=c.num_heads,
        num_key_value_heads=c.num_kv_heads,
        head_dim=c.head_dim,
        hidden_act=c.activation,
        max_position_embeddings=c.max_position_embeddings,
        rms_norm_eps=c.norm_eps,
        rope_parameters=rope,
    )
    if c.family in ("llama", "qwen3"):
        d["attention_bias"] = c.qkv_bias
    if c.family == "llama":
        d["mlp_bias"] = c.mlp_bias
    if c.family == "mistral":
        d["sliding_window"] = c.sliding_window
    if c.family in ("qwen2", "qwen3"):
        d["use_sliding_window"] = False
    return d


_GPT2_KEYS = """vocab_size n_positions n_embd n_layer n_head n_inner activation_function
    layer_norm_epsilon scale_attn_weights scale_attn_by_inverse_layer_idx add_cross_attention
    tie_word_embeddings""".split()


def _from_gpt2(hf: dict, family: str) -> tuple[dict, set[str]]:
    _require(hf, "scale_attn_weights", True, True)
    _require(hf, "scale_attn_by_inverse_layer_idx", False, False)
    _require(hf, "add_cross_attention", False, False)
    width, heads = hf.get("n_embd", 768), _size(hf, "n_head", 12)
    fields = dict(
        vocab_size=hf.get("vocab_size", 50257),
        hidden_size=width,
        intermediate_size=hf.get("n_inner") or 4 * width,
        num_layers=hf.get("n_layer", 12),
        num_heads=heads,
        num_kv_heads=heads,
        head_dim=width // heads,
        max_position_embeddings=hf.get("n_positions", 1024),
        norm="layer",
        norm_eps=hf.get("layer_norm_epsilon", 1e-5),
        mlp="plain",
        activation=_activation(hf, "activation_function", "gelu_new"),
        position="learned",
        qkv_bias=True,
        o_bias=True,
        mlp_bias=True,
        tie_embeddings=bool(hf.get("tie_word_embeddings", True)),
    )
    return fields, set(_GPT2_KEYS)


def _to_gpt2(c: ModelConfig) -> dict[str, Any]:
    return dict(
        vocab_size=c.vocab_size,
        n_positions=c.max_position_embeddings,
        n_embd=c.hidden_size,
        n_layer=c.num_layers,
        n_head=c.num_heads,
        n_inner=c.intermediate_size,
        activation_function=c.activation,
        layer_norm_epsilon=c.norm_eps,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
