"""Packed and padded batches give the same per-token log-probs through the model.

The model is `mipo_jax.models.CausalLM` (tiny random Llama) with the attention rule of
`mipo_jax.models.masks`; the ground truth is each ``prompt + completion`` run alone.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mipo_jax.data import Layout, PreferenceIterator, load_rows, tokenize_records, tokenize_rows
from mipo_jax.data.batch import attention_mask, gather_slots
from mipo_jax.data.debug import efficiency
from mipo_jax.data.embedded import embedded_path, load_tokenizer
from mipo_jax.losses.logps import token_logps
from mipo_jax.models import CausalLM, ModelConfig

LAYOUTS = {  # one compiled shape each
    "padded": Layout("padded", batch_size=8, row_length=128),
    "pairs": Layout("pairs", rows=3, groups=2, row_length=400),
    "shared_prompt": Layout("shared_prompt", rows=3, groups=2, row_length=400),
}


@pytest.fixture(autouse=True, scope="module")
def fast_compile():
    old = jax.config.values["jax_disable_most_optimizations"]
    jax.config.update("jax_disable_most_optimizations", True)
    yield
    jax.config.update("jax_disable_most_optimizations", old)


@pytest.fixture(scope="module")
def setup():
    tok = load_tokenizer("chat_bpe")
    rows = [json.loads(line) for line in open(embedded_path("chat", "test"))][:48]
    data = tokenize_records(rows, tok)
    cfg = ModelConfig(
        family="llama", vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_layers=2,
        num_heads=4, num_kv_heads=2, head_dim=8, tie_embeddings=True,
    )  # fmt: skip
    model = CausalLM(cfg, rngs=nnx.Rngs(0))

    @jax.jit
    def slot_logps(b):
        rows = lambda x: x.reshape(-1, x.shape[-1])  # noqa: E731
        g, k, t = b["tokens"].shape
        attend = b.get("attend_to")
        logits = model(rows(b["tokens"]), rows(b["positions"]), rows(b["segment_ids"]),
                       attend_to=None if attend is None else rows(attend))  # fmt: skip
        logits = gather_slots(logits.reshape(g, k, t, -1), b["pred_index"])
        return token_logps(logits, b["targets"]) * b["mask"]

    return data, model, slot_logps


def per_example(data, layout, slot_logps, transform=lambda b: b):
    """example id -> [S, C] per-token log-probs, over one epoch (nothing dropped)."""
    out = {}
    for b in PreferenceIterator(data, layout, num_epochs=1, drop_remainder=False):
        lp = np.asarray(slot_logps(transform({k: jnp.asarray(v) for k, v in b.items()})))
        for g, p in zip(*np.nonzero(b["pair_valid"])):
            out[int(b["example_id"][g, p])] = lp[g, p]
    return out


def alone(model, data, i):
    """Per-token completion log-probs of example i, each sequence run by itself."""
    out = []
    for comp in data.completions:
        seq = np.r_[data.prompt[i], comp[i]]
        logits = jax.jit(model)(jnp.asarray(seq)[None])[0]
        lp = np.asarray(token_logps(logits[:-1], jnp.asarray(seq[1:])))
        out.append(lp[len(data.prompt[i]) - 1 :])
    return out


def test_packed_equals_padded_equals_alone(setup):
    data, model, slot_logps = setup
    got = {name: per_example(data, lay, slot_logps) for name, lay in LAYOUTS.items()}
    ids = sorted(got["padded"])
    assert (
        ids
        == sorted(data.example_id.tolist())
        == sorted(got["pairs"])
        == sorted(got["shared_prompt"])
    )
    row = {int(e): i for i, e in enumerate(data.example_id)}
    for e in ids[:3]:
        for side, lp in enumerate(alone(model, data, row[e])):
            np.testing.assert_allclose(got["padded"][e][side, : len(lp)], lp, rtol=1e-5, atol=1e-5)
    for name in ("pairs", "shared_prompt"):
        for e in ids:
            np.testing.assert_allclose(got[name][e], got["padded"][e], rtol=1e-5, atol=1e-5)


def test_shared_prompt_needs_its_mask(setup):
    """Negative control: without attend_to the completions cannot see the prompt."""
    data, _, slot_logps = setup
    layout = LAYOUTS["shared_prompt"]
    good = per_example(data, layout, slot_logps)
    blind = per_example(
        data, layout, slot_logps, lambda b: {**b, "attend_to": jnp.zeros_like(b["attend_to"])}
    )
    assert max(np.abs(good[e] - blind[e]).max() for e in good) > 0.1


def test_row_structure(setup):
    data = setup[0]
    b = next(PreferenceIterator(data, LAYOUTS["shared_prompt"], num_epochs=1))
    mask = np.asarray(attention_mask(b)).reshape(*b["tokens"].shape, -1)
    g, p = np.argwhere(b["pair_valid"] > 0)[0]
    i = int(np.flatnonzero(data.example_id == b["example_id"][g, p])[0])
    prompt, chosen, rejected = data.prompt[i], data.completions[0][i], data.completions[1][i]
    flat = b["tokens"][g].reshape(-1)
    start = int(b["pred_index"][g, p, 0, 0]) - len(prompt) + 1  # flat start of the prompt
    row, off = divmod(start, b["tokens"].shape[-1])
    n = len(prompt) + len(chosen) + len(rejected)
    np.testing.assert_array_equal(flat[start : start + n], np.r_[prompt, chosen, rejected])
    pos = b["positions"][g, row, off : off + n]
    np.testing.assert_array_equal(
        pos, np.r_[np.arange(len(prompt) + len(chosen)), len(prompt) + np.arange(len(rejected))]
    )
    m = mask[g, row, off : off + n, off : off + n]
    pw, cw = len(prompt), len(chosen)
    assert (
        m[pw + cw :, :pw].all() and not m[pw + cw :, pw : pw + cw].any()
    )  # rejected: prompt, not chosen
    assert m[pw : pw + cw, :pw].all() and not m[:pw, pw:].any()


@pytest.mark.parametrize(
    "name,tokenizer,row_length",
    [
        ("controlled", "toy_words", 256),
        ("arithmetic", "toy_chars", 256),
        ("chat", "chat_bpe", 1024),
    ],
)
def test_packing_efficiency_on_embedded_data(name, tokenizer, row_length):
    data = tokenize_rows(load_rows(f"embedded:{name}"), load_tokenizer(tokenizer))
    for kind in ("pairs", "shared_prompt"):
        e = efficiency(data, Layout(kind, rows=8, row_length=row_length))
        assert e["non_pad_fraction"] >= 0.95, (name, kind, e)
