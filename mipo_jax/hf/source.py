"""Where checkpoint tensors come from: the `CheckpointSource` protocol.

A source speaks Hugging Face: `config` is the checkpoint's `config.json` as a dict, `keys()`
lists the tensor names of the PyTorch state dict (``model.layers.0.self_attn.q_proj.weight``,
``transformer.h.0.attn.c_attn.weight``, ...), and `get(name)` returns one tensor as a NumPy
array in the HF/PyTorch layout (a `nn.Linear` weight is ``[out, in]``; a GPT-2 `Conv1D` weight
is ``[in, out]``). Floating tensors may be float16/bfloat16/float32; the loader casts them.

`mipo_jax.hf.load.load_pretrained` reads one tensor at a time through `get`, so a source
should not hold more than the tensor it is returning (safetensors files are memory-mapped;
GGUF tensors are dequantised on demand). Implementations: `SafetensorsSource` (a folder with
``model.safetensors`` or a sharded ``model.safetensors.index.json``) and `GGUFSource`
(`mipo_jax.hf.gguf`).
"""

from typing import Any, Protocol, runtime_checkable

import numpy as np


@runtime_checkable
class CheckpointSource(Protocol):
    """A read-only checkpoint in Hugging Face naming and layout."""

    @property
    def config(self) -> dict[str, Any]:
        """The HF ``config.json`` contents (``model_type``, ``hidden_size``, ...)."""
        ...

    def keys(self) -> list[str]:
        """All tensor names, in HF state-dict naming."""
        ...

    def get(self, name: str) -> np.ndarray:
        """One tensor, HF/PyTorch layout. Raises `KeyError` naming `name` if absent."""
        ...
