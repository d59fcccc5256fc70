"""SparsePO's token-mask network, trained next to the policy.

:class:`SparseMasks` (Christopoulou et al. 2024; mathematics §2.8) is a port of huawei-noah/HEBO
SparsePO's default ``mask_model="simple_all"`` (``src/masks/mask_models.py``
``SimpleMaskAllLayers``). It reads the live reference's hidden states of every layer, as
transformers' ``output_hidden_states`` gives them minus the embeddings (the original's
``reference_states[1:]``, ``src/masks/pipeline_*.py``): the outputs of layers 1..L-1 and
the final-normed last, at each completion token's predecessor position (its ``[:, :-1]``).
Per layer a LayerNorm (one, shared by all layers) then Linear(D→1) and ReLU; the L scores
go through a bias-free Linear(L→1) mixer, then ReLU. Dropout follows each ReLU (at p = 0
in the original's runs: see ``configs/sparsepo.py``). Sparse-common is one such net;
independent masks (``rw_kl_independent``) are two separate nets, each with its own
LayerNorm. The step gathers each layer's slots inside the reference's layer loop
(``CausalLM.hidden(all_layers=True, select=)``), so only ``[L+1, slots, D]`` is kept.

Initialisation is the one the original's nets end up with: they are attributes of the
policy built by ``from_pretrained`` (``src/alignment/utils.py`` ``get_sparse_pipeline``),
so their weights are missing keys that transformers (4.42.3) fills with the model's
``_init_weights``: Linear weights N(0, initializer_range = 0.02), biases 0, LayerNorm 1 and
0. The masks therefore start close to 0 (of order 0.02²·√(D·L/2), ≈ 0.06 for D = 2048 and
L = 24; many exactly 0), not at 1: the loss starts near log 2, not at TDPO1's. A net whose
L mixer weights are all negative (chance 2^-L) gives masks that are 0 everywhere and never
get a gradient; `mipo_jax.train.modules` warns.
"""

import jax
import jax.numpy as jnp
from flax import nnx


def _dropout(x: jax.Array, rng: jax.Array | None, rate: float) -> jax.Array:
    """Inverted dropout (``torch.nn.Dropout``); identity without ``rng`` or at rate 0."""
    if rng is None or rate <= 0:
        return x
    keep = jax.random.bernoulli(rng, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0.0)


class MaskNet(nnx.Module):
    """One ``SimpleMaskAllLayers``: L per-layer scores, mixed into one mask per token.

    Parameters: ``norm`` (LayerNorm scale and bias ``[D]``), ``layer_kernel`` ``[L, D]`` and
    ``layer_bias`` ``[L]`` (the L Linear(D→1) maps, stacked), ``mixer`` ``[L]``.
    """

    def __init__(self, num_layers: int, width: int, eps: float, init_std: float, *, rngs):
        self.norm = nnx.LayerNorm(width, epsilon=eps, rngs=rngs)
        init = nnx.initializers.normal(stddev=init_std)
        self.layer_kernel = nnx.Param(init(rngs.params(), (num_layers, width), jnp.float32))
        self.layer_bias = nnx.Param(jnp.zeros((num_layers,), jnp.float32))
        self.mixer = nnx.Param(init(rngs.params(), (num_layers,), jnp.float32))

    def __call__(self, hs: jax.Array, rng: jax.Array | None, dropout: float) -> jax.Array:
        """Mask ``[...]`` from every layer's hidden states ``hs`` ``[L, ..., D]``."""
        layer_rng, mix_rng = (None, None) if rng is None else jax.random.split(rng)
        x = self.norm(hs.astype(jnp.float32))
        scores = jnp.einsum("l...d,ld->...l", x, self.layer_kernel[...])
        scores = scores + self.layer_bias[...].reshape((1,) * (scores.ndim - 1) + (-1,))
        scores = _dropout(jax.nn.relu(scores), layer_rng, dropout)
        m = jax.nn.relu(scores @ self.mixer[...])
        return _dropout(m, mix_rng, dropout)


class SparseMasks(nnx.Module):
    """SparsePO's masks: ``reward`` gives m^u (and m^d when common), ``kl`` m^d if independent."""

    def __init__(
        self,
        num_layers: int,
        width: int,
        independent: bool,
        *,
        eps: float,
        init_std: float = 0.02,
        rngs: nnx.Rngs,
    ):
        make = lambda: MaskNet(num_layers, width, eps, init_std, rngs=rngs)
        self.reward = make()
        self.kl = make() if independent else None

    def __call__(self, hs: jax.Array, rng: jax.Array | None, dropout: float):
        """``(m_u, m_d)`` ``[...]`` from ``hs`` ``[L, ..., D]``; ``m_d`` is None if common."""
        rng_u, rng_d = (None, None) if rng is None else jax.random.split(rng)
        m_u = self.reward(hs, rng_u, dropout)
        return m_u, None if self.kl is None else self.kl(hs, rng_d, dropout)
