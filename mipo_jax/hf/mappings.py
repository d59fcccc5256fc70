"""Per-family tables: HF tensor name <-> our parameter path(s) and the layout change.

A `Rule` maps one HF tensor to one or more of our parameters (GPT-2's fused ``c_attn``
holds q, k and v). ``{i}`` in an HF name is the layer index; our paths under ``layers.``
are stacked with a leading layer axis. Kinds of layout change:

  copy    same shape (embeddings, norms, output/MLP biases)
  flat    HF is 1-D; ours is reshaped (q/k/v biases ``[H*K] -> [H, K]``)
  linear  HF `nn.Linear` weight ``[out, in]``; ours is ``[*in, *out]`` (transpose, reshape)
  conv1d  HF GPT-2 `Conv1D` weight ``[in, out]``; ours is ``[*in, *out]`` (reshape)

Fused tensors split their last HF axis (``out``) into equal parts, one per path. A rule
applies when the model has its parameters (bias rules only for models with biases).
"""

import dataclasses
import math
import re

import numpy as np


@dataclasses.dataclass(frozen=True)
class Rule:
    hf: str
    paths: tuple[str, ...]
    kind: str = "copy"
    n_in: int = 1  # leading axes of our kernel that are HF's "in" axis

    @property
    def stacked(self) -> bool:
        return "{i}" in self.hf

    def hf_name(self, layer: int | None) -> str:
        return self.hf.format(i=layer) if self.stacked else self.hf

    def hf_shape(self, shapes: list[tuple[int, ...]]) -> tuple[int, ...]:
        """The HF tensor's shape given our (per-layer) parameter shapes."""
        if self.kind == "copy":
            return tuple(shapes[0])
        if self.kind == "flat":
            return (sum(math.prod(s) for s in shapes),)
        n_in = math.prod(shapes[0][: self.n_in])
        n_out = sum(math.prod(s[self.n_in :]) for s in shapes)
        return (n_out, n_in) if self.kind == "linear" else (n_in, n_out)

    def to_ours(self, x: np.ndarray, shapes: list[tuple[int, ...]]) -> list[np.ndarray]:
        """Split/transpose/reshape one HF tensor into our parameters (per layer)."""
        if self.kind == "linear":
            x = x.T
        if len(shapes) == 1:
            return [x.reshape(shapes[0])]
        flat = self.kind == "flat"
        sizes = [math.prod(s) if flat else math.prod(s[self.n_in :]) for s in shapes]
        parts = np.split(x, np.cumsum(sizes)[:-1], axis=-1)
        return [p.reshape(s) for p, s in zip(parts, shapes, strict=True)]

    def to_hf(self, arrays: list[np.ndarray]) -> np.ndarray:
        """Inverse of `to_ours`."""
        if self.kind == "copy":
            return arrays[0]
        if self.kind == "flat":
            return np.concatenate([a.reshape(-1) for a in arrays])
        n_in = math.prod(arrays[0].shape[: self.n_in])
        x = np.concatenate([a.reshape(n_in, -1) for a in arrays], axis=-1)
        return x.T if self.kind == "linear" else x


def _llama_rules() -> tuple[Rule, ...]:
    layer = "model.layers.{i}."
    rules = [
        Rule("model.embed_tokens.weight", ("embed.embedding",)),
        Rule("model.norm.weight", ("final_norm.scale",)),
        Rule("lm_head.weight", ("lm_head.kernel",), "linear"),
        Rule(layer + "input_layernorm.weight", ("layers.attn_norm.scale",)),
        Rule(layer + "post_attention_layernorm.weight", ("layers.mlp_norm.scale",)),
        Rule(layer + "self_attn.o_proj.weight", ("layers.attn.o.kernel",), "linear", n_in=2),
        Rule(layer + "self_attn.o_proj.bias", ("layers.attn.o.bias",)),
        Rule(layer + "self_attn.q_norm.weight", ("layers.attn.q_norm.scale",)),
        Rule(layer + "self_attn.k_norm.weight", ("layers.attn.k_norm.scale",)),
    ]
    for p in "qkv":
        rules.append(
            Rule(layer + f"self_attn.{p}_proj.weight", (f"layers.attn.{p}.kernel",), "linear")
        )
        rules.append(Rule(layer + f"self_attn.{p}_proj.bias", (f"layers.attn.{p}.bias",), "flat"))
    for p in ("gate", "up", "down"):
        rules.append(Rule(layer + f"mlp.{p}_proj.weight", (f"layers.mlp.{p}.kernel",), "linear"))
        rules.append(Rule(layer + f"mlp.{p}_proj.bias", (f"layers.mlp.{p}.bias",)))
    return tuple(rules)


def _gpt2_rules() -> tuple[Rule, ...]:
    h = "transformer.h.{i}."
    qkv = ("layers.attn.q", "layers.attn.k", "layers.attn.v")
    return (
        Rule("transformer.wte.weight", ("embed.embedding",)),
        Rule("transformer.wpe.weight", ("pos_embed.embedding",)),
        Rule("transformer.ln_f.weight", ("final_norm.scale",)),
        Rule("transformer.ln_f.bias", ("final_norm.bias",)),
        Rule("lm_head.weight", ("lm_head.kernel",), "linear"),
        Rule(h + "ln_1.weight", ("layers.attn_norm.scale",)),
        Rule(h + "ln_1.bias", ("layers.attn_norm.bias",)),
        Rule(h + "attn.c_attn.weight", tuple(p + ".kernel" for p in qkv), "conv1d"),
        Rule(h + "attn.c_attn.bias", tuple(p + ".bias" for p in qkv), "flat"),
        Rule(h + "attn.c_proj.weight", ("layers.attn.o.kernel",), "conv1d", n_in=2),
        Rule(h + "attn.c_proj.bias", ("layers.attn.o.bias",)),
        Rule(h + "ln_2.weight", ("layers.mlp_norm.scale",)),
        Rule(h + "ln_2.bias", ("layers.mlp_norm.bias",)),
        Rule(h + "mlp.c_fc.weight", ("layers.mlp.up.kernel",), "conv1d"),
        Rule(h + "mlp.c_fc.bias", ("layers.mlp.up.bias",)),
        Rule(h + "mlp.c_proj.weight", ("layers.mlp.down.kernel",), "conv1d"),
        Rule(h + "mlp.c_proj.bias", ("layers.mlp.down.bias",)),
    )


_LLAMA = _llama_rules()
TABLES: dict[str, tuple[Rule, ...]] = {
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": _LLAMA,
    "qwen3": _LLAMA,
    "gpt2": _gpt2_rules(),
}

# HF tensors that carry no parameters: non-persistent buffers some checkpoints saved.
IGNORED = {
    "llama": re.compile(r".*rotary_emb\.inv_freq$"),
    "mistral": re.compile(r".*rotary_emb\.inv_freq$"),
    "qwen2": re.compile(r".*rotary_emb\.inv_freq$"),
    "qwen3": re.compile(r".*rotary_emb\.inv_freq$"),
    "gpt2": re.compile(r".*\.attn\.(masked_)?bias$"),
}


def normalise_name(family: str, name: str) -> str:
    """Old GPT-2 checkpoints (GPT2Model) lack the ``transformer.`` prefix."""
    if family == "gpt2" and not name.startswith(("transformer.", "lm_head.")):
        return "transformer." + name
    return name
