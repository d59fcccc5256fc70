"""Trainable modules that some algorithms add next to the policy.

* :class:`MaskNet`: SparsePO's token-mask network (Christopoulou et al. 2024; spec §2.8). The
  original ``SimpleMaskAllLayers`` reads every layer of the reference; we read its final
  hidden states: LayerNorm, a linear map to one mask (sparse-common) or two (independent),
  ReLU, dropout. The bias starts at 1, so the masks start at 1 and the loss at TDPO1's.
* The learnable prior ζ_φ of ``mipo_learned`` (spec §1.5) is a small prompt-free
  :class:`~mipo_jax.models.CausalLM`; :func:`prior_logps` scores completions with it.
"""

import jax
import jax.numpy as jnp
from flax import nnx

from mipo_jax.losses.logps import chunked_token_logps


class MaskNet(nnx.Module):
    def __init__(self, width: int, independent: bool, *, rngs: nnx.Rngs):
        self.norm = nnx.LayerNorm(width, rngs=rngs)
        outputs = 2 if independent else 1
        init = nnx.initializers.normal(stddev=0.02)
        self.proj = nnx.Linear(width, outputs, kernel_init=init, rngs=rngs)
        self.proj.bias[...] = jnp.ones((outputs,), jnp.float32)

    def __call__(self, h: jax.Array, rng: jax.Array | None, dropout: float):
        """Masks ``(m_u, m_d)`` ``[..., C]`` from hidden states; ``m_d`` is None if common."""
        m = jax.nn.relu(self.proj(self.norm(h.astype(jnp.float32))))
        if rng is not None and dropout > 0:
            keep = jax.random.bernoulli(rng, 1.0 - dropout, m.shape)
            m = jnp.where(keep, m / (1.0 - dropout), 0.0)
        return (m[..., 0], m[..., 1] if m.shape[-1] == 2 else None)


def prior_logps(prior, y: jax.Array, mask: jax.Array, bos_id: int, chunk_size: int) -> jax.Array:
    """log ζ_φ(y_t | y_<t) per completion token ``[N, C]``, prompt-free, 0 off ``mask``.

    The completion is fed as ``[bos, y_0, ..., y_{C-2}]`` so position t predicts y_t.
    """
    shape = y.shape
    y = y.reshape(-1, shape[-1])
    inp = jnp.concatenate([jnp.full((y.shape[0], 1), bos_id, y.dtype), y[:, :-1]], -1)
    h = prior.hidden(inp)
    lp = chunked_token_logps(h, prior.unembed_weight(), y, chunk_size=chunk_size)
    return lp.reshape(shape) * mask
