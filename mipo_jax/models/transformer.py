"""Decoder-only transformer for every supported family (Llama, Mistral, Qwen2/3, GPT-2).

The families differ only in `ModelConfig` switches: norm kind, gated or plain MLP, biases,
q/k norm, RoPE or learned positions, tied embeddings, sliding window.

API (shape letters: B batch, T tokens, S cache slots, D width, V vocabulary)::

    model = CausalLM(cfg, rngs=nnx.Rngs(0))
    logits = model(tokens, positions, segment_ids, attend_to=None)   # [B, T, V] float32
    h = model.hidden(tokens, positions, segment_ids)                 # [B, T, D] final-normed
    hs = model.hidden(tokens, all_layers=True, select=f)  # [L+1, *f(h).shape], HF's hidden_states
    w = model.unembed_weight()                                       # [D, V]; logits = h @ w
    logits, cache = model.decode(tokens, positions, segment_ids, cache)  # with a KVCache

`positions`, `segment_ids` and `attend_to` follow `mipo_jax.models.masks`. `hidden` plus
`unembed_weight` let the training path compute log-probs in chunks without ``[B, T, V]``.

Layers are always stored stacked (leading axis 'layers'); `cfg.scan_layers` chooses between
`jax.lax.scan` and a Python loop over them, and `cfg.remat` wraps each layer in
`jax.checkpoint`.
"""

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx, struct

from mipo_jax.models import attention, masks
from mipo_jax.models.config import ModelConfig
from mipo_jax.models.layers import (
    Dense,
    Embed,
    Norm,
    activation,
    apply_rope,
    gated_mlp,
    rope_inv_freq,
)
from mipo_jax.models.remat import remat
from mipo_jax.sharding import shard

ACT = ("batch", "seq", "act_embed")


@struct.dataclass
class KVCache:
    """Keys and values of every layer for `S` slots; all rows write the same slot `index`."""

    k: jax.Array  # [L, B, S, N, K]
    v: jax.Array  # [L, B, S, N, K]
    segment_ids: jax.Array  # [B, S]; 0 = empty slot or padding
    positions: jax.Array  # [B, S]
    index: jax.Array  # [] int32, the next slot to write

    @classmethod
    def init(cls, cfg: ModelConfig, batch: int, slots: int) -> "KVCache":
        shape = (cfg.num_layers, batch, slots, cfg.num_kv_heads, cfg.head_dim)
        zeros = jnp.zeros(shape, cfg.compute_dtype)
        ids = jnp.zeros((batch, slots), jnp.int32)
        return cls(zeros, zeros, ids, ids, jnp.zeros((), jnp.int32))


def dot_product_attention(
    q, k, v, mask, scale: float, *, block: int = 0, span: int | None = None
) -> jax.Array:
    """Grouped-query attention: q ``[B,T,H,K]``, k/v ``[B,S,N,K]``, mask ``[B,T,S]``.

    ``block > 0`` (self-attention only: T == S, query t is key t) runs the queries in blocks
    of ``block`` rows, each against the keys up to its last query (causality: the keys after
    it are never visible), and, with ``span``, only from ``span - 1`` keys before its first
    query: the caller guarantees no query sees a key more than ``span - 1`` places back
    (packed rows: the longest packed unit). The result equals the unblocked one; the work on
    the score matrix drops from T² to about T·(block + min(T, span)) / 2 for causal rows.
    Scores and the softmax are float32 (float64 for float64 inputs); the probabilities are
    normalised before the value matmul, in v's dtype, as transformers computes them
    (normalising the ``[T, K]`` output instead saves a pass over the probabilities but moved
    SmolLM2's float32 logits past 1e-4 of transformers').
    """
    b, t, h, d = q.shape
    n = k.shape[2]
    q = q.reshape(b, t, n, h // n, d)
    acc = jnp.promote_types(q.dtype, jnp.float32)  # float32 (float64 for float64 inputs)
    outs = []
    for lo in range(0, t, block or t):
        hi = min(t, lo + block) if block else t
        k_hi = hi if block else k.shape[1]
        k_lo = max(0, lo - span + 1) if (block and span) else 0
        scores = jnp.einsum(
            "btngk,bsnk->bngts", q[:, lo:hi], k[:, k_lo:k_hi], preferred_element_type=acc
        )
        visible = mask[:, None, None, lo:hi, k_lo:k_hi]
        scores = jnp.where(visible, scores * scale, jnp.finfo(acc).min)
        probs = jax.nn.softmax(scores, axis=-1)  # normalised before PV, as transformers does
        out = jnp.einsum(
            "bngts,bsnk->bngtk", probs.astype(v.dtype), v[:, k_lo:k_hi], preferred_element_type=acc
        )
        outs.append(out)
    out = outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=3)
    return out.transpose(0, 3, 1, 2, 4).reshape(b, t, h, d).astype(v.dtype)


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        d, h, n, k = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        dense = functools.partial(Dense, cfg=cfg, rngs=rngs)
        self.q = dense((d,), (h, k), ("embed", "heads", "head_dim"), use_bias=cfg.qkv_bias)
        self.k = dense((d,), (n, k), ("embed", "kv_heads", "head_dim"), use_bias=cfg.qkv_bias)
        self.v = dense((d,), (n, k), ("embed", "kv_heads", "head_dim"), use_bias=cfg.qkv_bias)
        self.o = dense((h, k), (d,), ("heads", "head_dim", "embed"), use_bias=cfg.o_bias)
        self.q_norm = Norm(k, ("head_dim",), cfg=cfg, kind="rms") if cfg.qk_norm else None
        self.k_norm = Norm(k, ("head_dim",), cfg=cfg, kind="rms") if cfg.qk_norm else None
        self.rope = (k, cfg.rope_theta, cfg.rope_scaling) if cfg.position == "rope" else None
        self.scale = k**-0.5
        self.block = cfg.attention_block
        self.impl = cfg.attention_impl

    def __call__(self, x, positions, mask, kv=None, span=None):
        q = shard(self.q(x), ("batch", "seq", "heads", "head_dim"))
        k = shard(self.k(x), ("batch", "seq", "kv_heads", "head_dim"))
        v = shard(self.v(x), ("batch", "seq", "kv_heads", "head_dim"))
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if self.rope is not None:
            inv_freq = rope_inv_freq(*self.rope)
            q, k = apply_rope(q, positions, inv_freq), apply_rope(k, positions, inv_freq)
        if kv is not None:
            k_cache, v_cache, index = kv
            k = jax.lax.dynamic_update_slice(k_cache, k.astype(k_cache.dtype), (0, index, 0, 0))
            v = jax.lax.dynamic_update_slice(v_cache, v.astype(v_cache.dtype), (0, index, 0, 0))
            kv = (k, v)
        if isinstance(mask, masks.SegmentMask):  # full sequence, mask-free implementation
            impl = attention.resolve(self.impl)
            out = attention.self_attention(
                q, k, v, mask, impl=impl, scale=self.scale, block=self.block, span=span
            )
        else:
            block = self.block if kv is None else 0  # blocks need query t == key t
            out = dot_product_attention(q, k, v, mask, self.scale, block=block, span=span)
        out = shard(out, ("batch", "seq", "heads", "head_dim"))
        return self.o(out), kv


class Mlp(nnx.Module):
    """Gated: down(act(gate x) · up x). Plain (GPT-2): down(act(up x))."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        d, f = cfg.hidden_size, cfg.intermediate_size
        dense = functools.partial(Dense, use_bias=cfg.mlp_bias, cfg=cfg, rngs=rngs)
        self.act = activation(cfg.activation)
        self.gate = dense((d,), (f,), ("embed", "mlp")) if cfg.mlp == "gated" else None
        self.up = dense((d,), (f,), ("embed", "mlp"))
        self.down = dense((f,), (d,), ("mlp", "embed"))
        self.custom_vjp = cfg.mlp_impl == "custom_vjp" and self.gate is not None
        if self.custom_vjp and cfg.mlp_bias:
            raise ValueError("mlp_impl='custom_vjp' has no biases: use mlp_impl='autodiff'")

    def __call__(self, x):
        if self.custom_vjp:
            dtype = self.up.dtype
            w = [m.kernel[...].astype(dtype) for m in (self.gate, self.up, self.down)]
            return gated_mlp(x.astype(dtype), *w, self.act, names=("batch", "seq", "mlp"))
        h = self.up(x)
        h = self.act(self.gate(x)) * h if self.gate is not None else self.act(h)
        return self.down(shard(h, ("batch", "seq", "mlp")))


class Block(nnx.Module):
    """Pre-norm decoder layer: x + attn(norm x), then x + mlp(norm x)."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.attn_norm = Norm(cfg.hidden_size, ("embed",), cfg=cfg)
        self.attn = Attention(cfg, rngs=rngs)
        self.mlp_norm = Norm(cfg.hidden_size, ("embed",), cfg=cfg)
        self.mlp = Mlp(cfg, rngs=rngs)

    def __call__(self, x, positions, mask, kv=None, span=None):
        h, kv = self.attn(self.attn_norm(x), positions, mask, kv, span)
        x = shard(x + h, ACT)
        x = shard(x + self.mlp(self.mlp_norm(x)), ACT)
        return x, kv


def _stacked_blocks(cfg: ModelConfig, rngs: nnx.Rngs) -> Block:
    @nnx.split_rngs(splits=cfg.num_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def make(rngs):
        return Block(cfg, rngs=rngs)

    return make(rngs)


class CausalLM(nnx.Module):
    """Token embedding, `num_layers` stacked `Block`s, final norm, (tied) unembedding."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.config = cfg
        d = cfg.hidden_size
        self.embed = Embed(cfg.vocab_size, d, ("vocab", "embed"), cfg=cfg, rngs=rngs)
        n_pos, learned = cfg.max_position_embeddings, cfg.position == "learned"
        self.pos_embed = Embed(n_pos, d, ("pos", "embed"), cfg=cfg, rngs=rngs) if learned else None
        self.layers = _stacked_blocks(cfg, rngs)
        self.final_norm = Norm(d, ("embed",), cfg=cfg)
        self.lm_head = (
            None
            if cfg.tie_embeddings
            else Dense(
                (d,), (cfg.vocab_size,), ("embed", "vocab"), use_bias=False, cfg=cfg, rngs=rngs
            )
        )

    def __call__(self, tokens, positions=None, segment_ids=None, *, attend_to=None, span=None):
        """Float32 logits ``[B, T, V]``."""
        return self.logits(
            self.hidden(tokens, positions, segment_ids, attend_to=attend_to, span=span)
        )

    def hidden(
        self,
        tokens,
        positions=None,
        segment_ids=None,
        *,
        attend_to=None,
        span=None,
        all_layers: bool = False,
        select: Callable[[jax.Array], jax.Array] | None = None,
    ):
        """Final-normed hidden states ``[B, T, D]`` in the compute dtype.

        ``span`` (static int, optional): no token attends to a key more than ``span - 1``
        places before it in its row (`masks.attention_span` of the batch must be ≤ span);
        with ``cfg.attention_block`` the attention then skips the key blocks further back.

        ``all_layers=True`` returns instead every layer's hidden states, stacked
        ``[L+1, B, T, D]``, as transformers' ``output_hidden_states=True`` gives them: the
        embeddings (with learned positions), the outputs of layers 1..L-1 (before any
        norm), and the final-normed output of the last layer (what the default returns).
        ``select`` (e.g. a gather of the positions one needs) maps each of them inside the
        layer loop, so only what it keeps is stacked: ``[L+1, *select(h).shape]``.
        """
        positions, segment_ids = _defaults(tokens, positions, segment_ids)
        window = self.config.sliding_window
        if attention.resolve(self.config.attention_impl) == "blocked":
            mask = masks.self_attention_mask(
                segment_ids, positions, attend_to=attend_to, sliding_window=window
            )
        else:  # built block by block inside the attention
            mask = masks.segment_mask(
                segment_ids, positions, attend_to=attend_to, sliding_window=window
            )
        if not all_layers:
            h, _, _ = self._trunk(tokens, positions, mask, None, span)
            return h
        select = select if select is not None else (lambda h: h)
        h, _, seen = self._trunk(tokens, positions, mask, None, span, select)
        return jnp.concatenate([seen, select(h)[None]])

    def unembed_weight(self) -> jax.Array:
        """``[D, V]`` in the compute dtype: logits = hidden @ unembed_weight()."""
        dtype = self.config.compute_dtype
        if self.lm_head is None:
            return self.embed.embedding[...].T.astype(dtype)
        return self.lm_head.kernel[...].astype(dtype)

    def logits(self, hidden: jax.Array) -> jax.Array:
        w = self.unembed_weight()
        out = jnp.einsum("btd,dv->btv", hidden, w, preferred_element_type=jnp.float32)
        return shard(out, ("batch", "seq", "vocab"))

    def decode(self, tokens, positions, segment_ids, cache: KVCache):
        """Run `tokens` ``[B, T]`` in cache slots ``index .. index+T-1``: (logits, new cache)."""
        t = tokens.shape[1]
        seg = jax.lax.dynamic_update_slice(cache.segment_ids, segment_ids, (0, cache.index))
        pos = jax.lax.dynamic_update_slice(cache.positions, positions, (0, cache.index))
        slots = jnp.arange(seg.shape[1], dtype=jnp.int32)
        q_index = cache.index + jnp.arange(t, dtype=jnp.int32)
        mask = masks.attention_mask(
            segment_ids,
            seg,
            jnp.broadcast_to(q_index, tokens.shape),
            jnp.broadcast_to(slots, seg.shape),
            q_positions=positions,
            kv_positions=pos,
            sliding_window=self.config.sliding_window,
        )
        kv = (cache.k, cache.v, cache.index)
        h, (k, v), _ = self._trunk(tokens, positions, mask, kv, None)
        cache = KVCache(k, v, seg, pos, cache.index + t)
        return self.logits(h), cache

    def _trunk(self, tokens, positions, mask, kv, span, select=None):
        """(final-normed hidden, new kv, stacked ``select`` of each layer's input or None)."""
        x = self.embed(tokens)
        if self.pos_embed is not None:
            x = x + self.pos_embed(positions)
        x = shard(x, ACT)
        x, kv, seen = self._run_layers(x, positions, mask, kv, span, select)
        return self.final_norm(x), kv, seen

    def _run_layers(self, x, positions, mask, kv, span, select):
        cfg = self.config
        graphdef, state = nnx.split(self.layers)
        k_all, v_all, index = kv if kv is not None else (None, None, None)

        def layer(x, layer_state, k, v):
            block = nnx.merge(graphdef, layer_state)
            return block(x, positions, mask, None if k is None else (k, v, index), span)

        layer = remat(layer, cfg.remat, prevent_cse=not cfg.scan_layers)
        keep = (lambda x: None) if select is None else select  # what each layer's input leaves
        if cfg.scan_layers:

            def body(x, xs):
                y, kv_i = layer(x, *xs)
                return y, (kv_i, keep(x))

            x, (kv_out, seen) = jax.lax.scan(body, x, (state, k_all, v_all))
        else:
            outs, seen = [], []
            for i in range(cfg.num_layers):
                take = lambda a, i=i: None if a is None else a[i]
                seen.append(keep(x))
                x, kv_i = layer(x, jax.tree.map(take, state), take(k_all), take(v_all))
                outs.append(kv_i)
            kv_out = None if kv is None else jax.tree.map(lambda *a: jnp.stack(a), *outs)
            seen = None if select is None else jnp.stack(seen)
        return x, kv_out, seen


def _defaults(tokens, positions, segment_ids):
    if positions is None:
        positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
    if segment_ids is None:
        segment_ids = jnp.ones(tokens.shape, jnp.int32)
    return positions, segment_ids
