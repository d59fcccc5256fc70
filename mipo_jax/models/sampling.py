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
"""

import functools
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mipo_jax.models.transformer import CausalLM, KVCache


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


def filter_logits(logits: jax.Array, temperature: float, top_k: int | None, top_p: float | None):
    """Logits with temperature applied and tokens outside top-k / top-p set to -inf."""
    logits = logits.astype(jnp.float32) / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p is not None and top_p < 1.0:
        order = jnp.argsort(-logits, axis=-1)
        sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        drop_sorted = mass_before >= top_p
        drop_sorted = drop_sorted.at[..., 0].set(False)
        drop = (
            jnp.zeros_like(drop_sorted)
            .at[jnp.arange(logits.shape[0])[:, None], order]
            .set(drop_sorted)
        )
        logits = jnp.where(drop, -jnp.inf, logits)
    return logits


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
) -> Generation:
    """Continue each prompt (a list of token ids) for up to `max_new_tokens` tokens.

    `eos_ids` defaults to the model config's EOS ids; a row stops after emitting one.
    """
    eos = tuple(model.config.eos_ids if eos_ids is None else eos_ids)
    tokens, mask = left_pad(prompts, pad_id)
    graphdef, state = nnx.split(model)
    settings = (max_new_tokens, float(temperature), top_k, top_p, eos, pad_id)
    return _generate(graphdef, state, tokens, mask, jax.random.key(seed), settings)


@functools.partial(jax.jit, static_argnums=(0, 5))
def _generate(graphdef, state, tokens, mask, key, settings) -> Generation:
    max_new, temperature, top_k, top_p, eos, pad_id = settings
    model = nnx.merge(graphdef, state)
    batch, width = tokens.shape
    cache = KVCache.init(model.config, batch, width + max_new)
    positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)
    logits, cache = model.decode(tokens, positions, mask, cache)
    lengths = jnp.sum(mask, axis=1)

    def pick(logits, key):
        if temperature == 0.0:
            return jnp.argmax(logits, axis=-1).astype(jnp.int32)
        filtered = filter_logits(logits, temperature, top_k, top_p)
        return jax.random.categorical(key, filtered, axis=-1).astype(jnp.int32)

    def step(carry):
        i, cache, last, done, out, key = carry
        key, sub = jax.random.split(key)
        tok = jnp.where(done, pad_id, pick(last, sub))
        out = out.at[:, i].set(tok)
        done = done | jnp.isin(tok, jnp.asarray(eos, jnp.int32)) if eos else done
        ones = jnp.ones((batch, 1), jnp.int32)
        logits, cache = model.decode(tok[:, None], (lengths + i)[:, None], ones, cache)
        return i + 1, cache, logits[:, -1], done, out, key

    def running(carry):
        return (carry[0] < max_new) & ~jnp.all(carry[3])

    out = jnp.full((batch, max_new), pad_id, jnp.int32)
    done = jnp.zeros((batch,), bool)
    init = (jnp.zeros((), jnp.int32), cache, logits[:, -1], done, out, key)
    _, _, _, _, out, _ = jax.lax.while_loop(running, step, init)
    generated = jnp.sum(jnp.cumsum(jnp.isin(out, jnp.asarray(eos or (-1,))), axis=1) == 0, axis=1)
    lengths_out = jnp.minimum(generated + 1, max_new) if eos else jnp.full((batch,), max_new)
    return Generation(out, lengths_out.astype(jnp.int32))
