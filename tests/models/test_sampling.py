"""Generation: greedy equals transformers' greedy generate; EOS, seeds, top-k / top-p."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

from mipo_jax.hf.load import load_pretrained
from mipo_jax.models.sampling import filter_logits, generate, left_pad
from tests.hf.test_load import save_tiny

PROMPTS = [[5, 6, 7, 8, 9, 10, 11, 12, 13], [12, 13], [20, 21, 22, 23]]
NEW = 12


def _hf_greedy(torch_model, prompts, eos, max_new=NEW):
    tokens, mask = left_pad(prompts, pad_id=0)
    with torch.no_grad():
        out = torch_model.generate(
            torch.tensor(tokens, dtype=torch.long),
            attention_mask=torch.tensor(mask, dtype=torch.long),
            max_new_tokens=max_new,
            do_sample=False,
            eos_token_id=eos,
            pad_token_id=0,
        )
    return out[:, tokens.shape[1] :].numpy()


@pytest.fixture(scope="module", params=["llama3", "mistral", "gpt2"])
def pair(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    torch_model = save_tiny(request.param, folder, seed=3)
    return torch_model, load_pretrained(folder)


def test_greedy_equals_transformers(pair):
    torch_model, model = pair
    # EOS = a token that greedy decoding emits mid-way in row 0, so rows stop at different steps.
    free = np.asarray(generate(model, PROMPTS, max_new_tokens=NEW, eos_ids=()).tokens)
    eos = int(free[0, 4])
    want = _hf_greedy(torch_model, PROMPTS, eos)
    out = generate(model, PROMPTS, max_new_tokens=NEW, eos_ids=(eos,), pad_id=0)
    got = np.asarray(out.tokens)
    np.testing.assert_array_equal(got[:, : want.shape[1]], want)
    assert (got[:, want.shape[1] :] == 0).all()
    first_eos = [list(row).index(eos) + 1 if eos in row else NEW for row in got]
    np.testing.assert_array_equal(np.asarray(out.lengths), first_eos)
    assert first_eos[0] == 5


def test_sampling_seeds_and_filters(pair):
    _, model = pair
    kw = dict(max_new_tokens=NEW, eos_ids=(), temperature=1.0)
    a = np.asarray(generate(model, PROMPTS, seed=1, **kw).tokens)
    b = np.asarray(generate(model, PROMPTS, seed=1, **kw).tokens)
    c = np.asarray(generate(model, PROMPTS, seed=2, **kw).tokens)
    np.testing.assert_array_equal(a, b)
    assert (a != c).any()
    greedy = np.asarray(generate(model, PROMPTS, max_new_tokens=NEW, eos_ids=()).tokens)
    top1 = generate(model, PROMPTS, seed=5, top_k=1, **kw).tokens
    np.testing.assert_array_equal(np.asarray(top1), greedy)
    tiny_p = generate(model, PROMPTS, seed=5, top_p=1e-6, **kw).tokens
    np.testing.assert_array_equal(np.asarray(tiny_p), greedy)


@pytest.mark.parametrize("top_k, top_p", [(5, None), (None, 0.5), (20, 0.9), (None, 0.999)])
def test_filters_match_transformers_warpers(top_k, top_p):
    logits = np.random.RandomState(0).randn(4, 64).astype(np.float32) * 3
    got = np.asarray(filter_logits(jnp.asarray(logits), 0.7, top_k, top_p))
    want = torch.tensor(logits / 0.7)
    if top_k is not None:
        want = TopKLogitsWarper(top_k)(None, want)
    if top_p is not None:
        want = TopPLogitsWarper(top_p)(None, want)
    want = want.numpy()
    np.testing.assert_array_equal(np.isfinite(got), np.isfinite(want))
    np.testing.assert_allclose(got[np.isfinite(got)], want[np.isfinite(want)], rtol=1e-6)


def test_sampling_follows_the_distribution():
    """Categorical draws from filtered logits: empirical frequencies near softmax."""
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
    filtered = filter_logits(logits, 1.0, None, 0.8)  # keeps 0.5 and 0.3
    draws = jax.random.categorical(jax.random.key(0), filtered, shape=(20000, 1))
    freq = np.bincount(np.asarray(draws).ravel(), minlength=4) / 20000
    np.testing.assert_allclose(freq, [0.625, 0.375, 0, 0], atol=0.015)
