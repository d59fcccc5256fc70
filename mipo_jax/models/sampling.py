"""Jitted generation with a KV cache: greedy or temperature / top-k / top-p sampling.

Prompts are LEFT-padded to a common length P, so every row's last prompt token sits in the
same column and all rows write the same cache slot at every step. Positions count only real
tokens (``cumsum(mask) - 1``), exactly as transformers does for left-padded generation, so
greedy decoding matches `transformers`' `generate(do_sample=False)` token for token.

    out = generate(model, [[5, 6, 7], [8, 9]], max_new_tokens=16, eos_ids=(2,))
    out.tokens   # [B, max_new_tokens]; after a row's EOS: pad_id
    out.lengths  # [B] generated tokens per row, EOS included

Sampling order follows transformers: temperature, then top-k, then top-p (nucleus, keeping
at least one token). ``temperature=0`` is greedy. The same seed gives the same samples.

On a mesh (``sharding=NamedSharding(mesh, P(("data", "fsdp")))``, the model's parameters in
their training sharding) the rows are split over the batch axes, also across processes:
every process passes the same, whole list of prompts and gets every row back. The random
numbers do not depend on the sharding or the process count: one key draws each step's noise
for the whole ``[B, V]`` batch, and with ``jax_threefry_partitionable`` (JAX's default) the
bits of element (b, v) are a function of the key and its index b·V + v alone. Rows added to
fill the last shard come after the real ones, so they change no real row's numbers either.
"""

import functools
import math
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from mipo_jax.models.transformer import CausalLM, KVCache

_EOS_SLOTS = 8


class Generation(NamedTuple):
    tokens: jax.Array  # [B, N] int32
    lengths: jax.Array  # [B] int32


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int, multiple: int = 8):
    """Token ids ``[B, P]`` and mask ``[B, P]`` (1 on prompt tokens), P rounded up to `multiple`."""
    longest = max(len(p) for p in prompts)
    width = -(-longest // multiple) * multiple
    tokens = np.full((len(prompts), width), pad_id, np.int32)
    mask = np.zeros((len(prompts), width), np.int32)
    for row, prompt in enumerate(prompts):
        if len(prompt) == 0:
            raise ValueError(f"prompt {row} is empty")
        tokens[row, width - len(prompt) :] = prompt
        mask[row, width - len(prompt) :] = 1
    return tokens, mask


def filter_logits(logits: jax.Array, temperature, top_k=None, top_p=None) -> jax.Array:
    """``[B, V]`` logits / temperature, with tokens outside top-k, then top-p, set to -inf.

    All three may be traced values (no recompilation per setting); ``top_k`` None or 0 and
    ``top_p`` None or 1.0 switch a filter off.
    """
    top_k = 0 if top_k is None else top_k
    top_p = 1.0 if top_p is None else top_p
    logits = logits.astype(jnp.float32) / temperature
    vocab = logits.shape[-1]
    sorted_desc = -jnp.sort(-logits, axis=-1)
    k = jnp.where(top_k > 0, jnp.minimum(top_k, vocab), vocab)
    kth = jax.lax.dynamic_index_in_dim(sorted_desc, k - 1, axis=-1, keepdims=True)
    logits = jnp.where(logits < kth, -jnp.inf, logits)
    order = jnp.argsort(-logits, axis=-1)
    probs = jax.nn.softmax(jnp.take_along_axis(logits, order, axis=-1), axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    drop_sorted = (mass_before >= top_p) & (top_p < 1.0)
    drop_sorted = drop_sorted.at[..., 0].set(False)
    rows = jnp.arange(logits.shape[0])[:, None]
    drop = jnp.zeros_like(drop_sorted).at[rows, order].set(drop_sorted)
    return jnp.where(drop, -jnp.inf, logits)


def generate(
    model: CausalLM,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_ids: Sequence[int] | None = None,
    pad_id: int = 0,
    seed: int = 0,
    sharding: NamedSharding | None = None,
) -> Generation:
    """Continue each prompt (a list of token ids) for up to `max_new_tokens` tokens.

    `eos_ids` defaults to the model config's EOS ids; a row stops after emitting one.
    `sharding`: the batch axis's sharding on the mesh of the model's parameters; every process
    passes the whole batch and gets every row back, as host (numpy) arrays.
    """
    eos = tuple(model.config.eos_ids if eos_ids is None else eos_ids)
    eos_arr = np.full(max(_EOS_SLOTS, len(eos)), -1, np.int32)  # -1 never matches
    eos_arr[: len(eos)] = eos
    rows = len(prompts)
    if sharding is not None:  # fill the last shard with copies of the last prompt
        prompts = list(prompts) + [prompts[-1]] * (-rows % batch_shards(sharding))
    tokens, mask = left_pad(prompts, pad_id)
    graphdef, state = nnx.split(model)
    knobs = (
        np.float32(temperature),
        np.int32(top_k or 0),
        np.float32(1.0 if top_p is None else top_p),
        eos_arr,
    )
    key = np.asarray(jax.random.key_data(jax.random.key(seed)))
    static = (max_new_tokens, pad_id)
    if sharding is None:
        return _generate(graphdef, state, tokens, mask, key, knobs, static)
    whole = NamedSharding(sharding.mesh, PartitionSpec())
    tokens, mask = (_global(x, sharding) for x in (tokens, mask))
    key, knobs = jax.tree.map(lambda x: _global(x, whole), (key, knobs))
    out = _generate(graphdef, state, tokens, mask, key, knobs, static)
    return Generation(*(_gather(x)[:rows] for x in out))


def batch_shards(sharding: NamedSharding) -> int:
    """Into how many blocks ``sharding`` splits the leading (batch) axis."""
    axes = sharding.spec[0] if len(sharding.spec) else None
    axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
    return math.prod(sharding.mesh.shape[a] for a in axes)


def _global(x: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """A global array from the whole value, which every process holds alike."""
    return jax.make_array_from_process_local_data(sharding, x, x.shape)


def _gather(x: jax.Array) -> np.ndarray:
    """A global array's whole value on every process."""
    if x.is_fully_addressable or x.is_fully_replicated:
        return np.asarray(x)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


@functools.partial(jax.jit, static_argnums=(0, 6))
def _generate(graphdef, state, tokens, mask, key_data, knobs, static) -> Generation:
    (temperature, top_k, top_p, eos), (max_new, pad_id) = knobs, static
    key = jax.random.wrap_key_data(key_data)
    model = nnx.merge(graphdef, state)
    batch, width = tokens.shape
    cache = KVCache.init(model.config, batch, width + max_new)
    positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)
    logits, cache = model.decode(tokens, positions, mask, cache)
    lengths = jnp.sum(mask, axis=1)
    sample = temperature > 0

    def step(carry):
        i, cache, last, done, out, key = carry
        key, sub = jax.random.split(key)
        filtered = filter_logits(last, jnp.where(sample, temperature, 1.0), top_k, top_p)
        tok = jnp.where(sample, jax.random.categorical(sub, filtered), jnp.argmax(last, axis=-1))
        tok = jnp.where(done, pad_id, tok).astype(jnp.int32)
        out = out.at[:, i].set(tok)
        done = done | jnp.isin(tok, eos)
        ones = jnp.ones((batch, 1), jnp.int32)
        logits, cache = model.decode(tok[:, None], (lengths + i)[:, None], ones, cache)
        return i + 1, cache, logits[:, -1], done, out, key

    def running(carry):
        return (carry[0] < max_new) & ~jnp.all(carry[3])

    out = jnp.full((batch, max_new), pad_id, jnp.int32)
    done = jnp.zeros((batch,), bool)
    init = (jnp.zeros((), jnp.int32), cache, logits[:, -1], done, out, key)
    out = jax.lax.while_loop(running, step, init)[4]
    before_eos = jnp.sum(jnp.cumsum(jnp.isin(out, eos), axis=1) == 0, axis=1)
    return Generation(out, jnp.minimum(before_eos + 1, max_new).astype(jnp.int32))
