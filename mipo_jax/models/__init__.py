"""Flax NNX decoder LLMs (Llama, Mistral, Qwen2/2.5, Qwen3, GPT-2), masks and sampling."""

from mipo_jax.models.config import ModelConfig, RopeScaling, UnsupportedConfigError
from mipo_jax.models.transformer import CausalLM, KVCache

__all__ = ["CausalLM", "KVCache", "ModelConfig", "RopeScaling", "UnsupportedConfigError"]
