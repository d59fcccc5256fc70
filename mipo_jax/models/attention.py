"""Which attention a full-sequence pass runs: `ModelConfig.attention_impl` and the backend.

* ``blocked``: `transformer.dot_product_attention` over the materialised ``[B, T, T]`` mask,
  queries in blocks; autodiff keeps every block's probabilities for the backward, so memory
  grows with T² (T·span with a span).
* ``flash``: `flash.flash_attention`, pure JAX with a custom VJP; memory linear in T.
* ``cudnn`` / ``splash``: the GPU / TPU kernels of `kernels`, each falling back to ``flash``
  where it does not support the mask; they need their backend.
* ``auto``: ``cudnn`` on CUDA GPUs, ``splash`` on TPUs, ``flash`` elsewhere.

Decoding with a KV cache always uses the dense mask (one query block; no backward).
"""

import jax

from mipo_jax.models import kernels
from mipo_jax.models.flash import flash_attention
from mipo_jax.models.masks import SegmentMask

_BACKEND = {"cudnn": "gpu", "splash": "tpu"}


def resolve(impl: str, backend: str | None = None) -> str:
    """The implementation ``impl`` names on ``backend`` (default: JAX's default backend)."""
    backend = backend or jax.default_backend()
    if impl == "auto":
        return {"gpu": "cudnn", "tpu": "splash"}.get(backend, "flash")
    need = _BACKEND.get(impl)
    if need is not None and backend != need:
        raise ValueError(
            f"attention_impl={impl!r} runs on {need.upper()} only, and JAX's backend is "
            f"{backend!r}: use 'flash' (the same result in pure JAX) or 'auto'"
        )
    return impl


def self_attention(q, k, v, mask: SegmentMask, *, impl: str, scale, block: int, span):
    """Attention of a full sequence with itself under ``mask`` (``impl`` already resolved,
    not 'blocked'): ``q [B,T,H,K]``, ``k/v [B,T,N,K]`` -> ``[B,T,H,K]``."""
    args = dict(mask=mask, scale=scale, block=block, span=span)
    if impl == "flash":
        return flash_attention(q, k, v, **args)
    if impl == "cudnn":
        return kernels.cudnn_or_flash(q, k, v, **args)
    if impl == "splash":
        return kernels.splash_or_flash(q, k, v, **args)
    raise ValueError(f"attention_impl={impl!r} is not a mask-free implementation")
