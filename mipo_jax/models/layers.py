"""Building blocks: dense maps over named axes, embeddings, norms, RoPE, activations.

Every parameter carries its logical axis names as ``out_sharding`` metadata (see
`mipo_jax.sharding.rules`); parameters live in `param_dtype`, matmuls run in the compute dtype,
norms and RoPE in float32.
"""

import functools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mipo_jax.models.config import ModelConfig, RopeScaling


def param(rngs: nnx.Rngs | None, init, shape, names: Sequence[str | None], dtype) -> nnx.Param:
    """A parameter with logical axis names. `rngs=None` for deterministic initialisers."""
    key = rngs.params() if rngs is not None else jax.random.key(0)
    return nnx.Param(
        init(key, tuple(shape), dtype), out_sharding=tuple(names), eager_sharding=False
    )


def _lead(x: jax.Array, ndim: int) -> jax.Array:
    """`x` with leading unit axes up to `ndim` (explicit broadcasting)."""
    return x.reshape((1,) * (ndim - x.ndim) + x.shape)


class Dense(nnx.Module):
    """y = x · W (+ b), contracting the trailing `len(in_shape)` axes of x with W's leading ones."""

    def __init__(self, in_shape, out_shape, names, *, use_bias: bool, cfg: ModelConfig, rngs):
        self.n_in = len(in_shape)
        self.dtype = jnp.dtype(cfg.compute_dtype)
        fan_in = math.prod(in_shape)
        init = nnx.initializers.normal(stddev=fan_in**-0.5)
        dtype = jnp.dtype(cfg.param_dtype)
        self.kernel = param(rngs, init, (*in_shape, *out_shape), names, dtype)
        zeros, bias_names = nnx.initializers.zeros, names[self.n_in :]
        self.bias = param(None, zeros, out_shape, bias_names, dtype) if use_bias else None

    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.kernel[...].astype(self.dtype)
        axes = (tuple(range(x.ndim - self.n_in, x.ndim)), tuple(range(self.n_in)))
        y = jax.lax.dot_general(x.astype(self.dtype), kernel, (axes, ((), ())))
        if self.bias is not None:
            y = y + _lead(self.bias[...].astype(self.dtype), y.ndim)
        return y


class Embed(nnx.Module):
    """Lookup table ``[N, D]``; N is the vocabulary (or GPT-2's positions)."""

    def __init__(self, num: int, dim: int, names, *, cfg: ModelConfig, rngs):
        self.dtype = jnp.dtype(cfg.compute_dtype)
        init = nnx.initializers.normal(stddev=1.0)
        self.embedding = param(rngs, init, (num, dim), names, jnp.dtype(cfg.param_dtype))

    def __call__(self, ids: jax.Array) -> jax.Array:
        return jnp.take(self.embedding[...], ids, axis=0).astype(self.dtype)


class Norm(nnx.Module):
    """RMSNorm (scale only) or LayerNorm (scale and bias) over the last axis, in float32."""

    def __init__(self, dim: int, names, *, cfg: ModelConfig, kind: str | None = None):
        self.kind = kind or cfg.norm
        self.eps = cfg.norm_eps
        dtype = jnp.dtype(cfg.param_dtype)
        self.scale = param(None, nnx.initializers.ones, (dim,), names, dtype)
        zeros = nnx.initializers.zeros
        self.bias = param(None, zeros, (dim,), names, dtype) if self.kind == "layer" else None

    def __call__(self, x: jax.Array) -> jax.Array:
        h = x.astype(jnp.float32)
        if self.kind == "layer":
            h = h - jnp.mean(h, axis=-1, keepdims=True)
        h = h * jax.lax.rsqrt(jnp.mean(h * h, axis=-1, keepdims=True) + self.eps)
        h = h * _lead(self.scale[...].astype(jnp.float32), h.ndim)
        if self.bias is not None:
            h = h + _lead(self.bias[...].astype(jnp.float32), h.ndim)
        return h.astype(x.dtype)


def activation(name: str):
    """The elementwise nonlinearity named in the HF config."""
    return {
        "silu": jax.nn.silu,
        "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
        "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
        "gelu": lambda x: jax.nn.gelu(x, approximate=False),
        "relu": jax.nn.relu,
    }[name]


def rope_inv_freq(head_dim: int, theta: float, scaling: RopeScaling | None) -> np.ndarray:
    """Inverse frequencies ``[K/2]`` as transformers computes them (float32)."""
    exponents = np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)
    inv = (1.0 / (np.float32(theta) ** exponents)).astype(np.float32)
    if scaling is None:
        return inv
    if scaling.kind == "linear":
        return (inv / np.float32(scaling.factor)).astype(np.float32)
    old = scaling.original_max_position_embeddings
    low_wavelen = old / scaling.low_freq_factor
    high_wavelen = old / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv
    scaled = np.where(wavelen > low_wavelen, inv / scaling.factor, inv)
    smooth = (old / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: np.ndarray) -> jax.Array:
    """Rotate ``x [B, T, H, K]`` by angles ``positions [B, T] × inv_freq`` (rotate-half layout)."""
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)[None, None]
    angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    h = x.astype(jnp.float32)
    x1, x2 = jnp.split(h, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return (h * cos + rotated * sin).astype(x.dtype)


def store(*xs: jax.Array) -> tuple[jax.Array, ...]:
    """Residuals as saved for a backward: 16-bit floats as raw ``uint16`` words.

    Inside a `lax.scan` over layers each residual is stacked with a dynamic-update-slice;
    XLA:CPU has no 16-bit-float version of it and converts the whole stacked buffer to
    float32 and back on every layer (a float32 copy of every stacked residual). Integer
    words are stacked as they are. `load` undoes it; both are free bitcasts elsewhere.
    """
    return tuple(
        jax.lax.bitcast_convert_type(x, jnp.uint16)
        if jnp.issubdtype(x.dtype, jnp.floating) and x.dtype.itemsize == 2
        else x
        for x in xs
    )


def load(dtype, *words: jax.Array) -> list[jax.Array]:
    """The arrays `store` saved, given their (floating) dtype."""
    return [jax.lax.bitcast_convert_type(w, dtype) if w.dtype == jnp.uint16 else w for w in words]


def gated_mlp(x: jax.Array, w_gate, w_up, w_down, act, names=None) -> jax.Array:
    """``down(act(x · w_gate) · (x · w_up))`` with a custom VJP (no biases).

    Saves only ``x`` and the two pre-activations (in the compute dtype) for the backward,
    which recomputes ``act`` and the gated product and forms the weight gradients as
    ``xᵀ · d(pre-activation)`` and ``hᵀ · dy``, each a single contraction over the tokens.
    ``names``: logical axis names of the ``[..., F]`` activations (a sharding constraint).
    """
    return _gated_mlp(act, names, x, w_gate, w_up, w_down)


def _constrain(h, names):
    if names is None:
        return h
    from mipo_jax.sharding import shard

    return shard(h, names)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _gated_mlp(act, names, x, w_gate, w_up, w_down):
    return _gated_mlp_fwd(act, names, x, w_gate, w_up, w_down)[0]


def _gated_mlp_fwd(act, names, x, w_gate, w_up, w_down):
    g = _constrain(jnp.einsum("...d,df->...f", x, w_gate), names)
    u = _constrain(jnp.einsum("...d,df->...f", x, w_up), names)
    y = jnp.einsum("...f,fd->...d", act(g) * u, w_down)
    return y, (w_gate, w_up, w_down, *store(x, g, u))


def _gated_mlp_bwd(act, names, res, dy):
    w_gate, w_up, w_down, *saved = res
    x, g, u = load(w_gate.dtype, *saved)
    a, act_vjp = jax.vjp(act, g)
    h = a * u
    tokens = "".join(chr(ord("a") + i) for i in range(x.ndim - 1))  # the leading axes
    dw_down = jnp.einsum(f"{tokens}d,{tokens}f->df", dy, h).T  # transposes dy, not h (F > D)
    dh = _constrain(jnp.einsum("...d,fd->...f", dy, w_down), names)
    du = dh * a
    (dg,) = act_vjp(dh * u)
    dw_gate = jnp.einsum(f"{tokens}d,{tokens}f->df", x, dg)
    dw_up = jnp.einsum(f"{tokens}d,{tokens}f->df", x, du)
    dx = jnp.einsum("...f,df->...d", dg, w_gate) + jnp.einsum("...f,df->...d", du, w_up)
    return dx, dw_gate, dw_up, dw_down


_gated_mlp.defvjp(_gated_mlp_fwd, _gated_mlp_bwd)
