"""Spec §3.9: a tiny autoregressive LM over {a, b, c, EOS}, max length 5, fully enumerated.

A tabular policy (logits per prompt and prefix) gives exact sequence probabilities by
walking the token tree; the per-token path (OUR ``token_logps``/``token_kl``, priors and
``mipo_loss`` on padded ``[N, T]`` arrays) must agree with it.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mipo_jax.losses import loss_config, mipo_loss, validate
from mipo_jax.losses.logps import token_kl, token_logps
from mipo_jax.priors import PRIORS, seq_sum
from mipo_jax.types import TokenInputs
from tests.derivations import util as U

ID_TOL = 1e-12
N_X = 2  # prompts


@pytest.fixture(autouse=True, scope="module")
def _x64():
    with jax.enable_x64(True):
        yield


@pytest.fixture(scope="module")
def lm():
    rng = np.random.default_rng(21)
    prefixes = U.all_prefixes()
    index = {p: i for i, p in enumerate(prefixes)}
    seqs = U.all_sequences()
    policy = 1.5 * rng.normal(size=(N_X, len(prefixes), U.VOCAB))
    ref = 1.5 * rng.normal(size=(N_X, len(prefixes), U.VOCAB))
    prior = 1.5 * rng.normal(size=(len(prefixes), U.VOCAB))  # prompt-free ζ_φ
    brute = {
        name: np.array([[U.brute_force_logprob(t[x], index, s) for s in seqs] for x in range(N_X)])
        for name, t in (("policy", policy), ("ref", ref))
    }
    brute["prior"] = np.array([U.brute_force_logprob(prior, index, s) for s in seqs])
    arrays = [U.token_arrays(seqs, t[x], index) for t in (policy, ref) for x in range(N_X)]
    ids, mask = arrays[0][0], arrays[0][1]
    logits = {
        "policy": np.stack([a[2] for a in arrays[:N_X]]),
        "ref": np.stack([a[2] for a in arrays[N_X:]]),
    }  # [X, N, T, V]
    logits["prior"] = U.token_arrays(seqs, prior, index)[2]
    lengths = np.array([len(s) for s in seqs], float)
    return dict(seqs=seqs, ids=ids, mask=mask, logits=logits, brute=brute, lengths=lengths)


def _token_logps(lm, name):
    logits = lm["logits"][name]
    ids = np.broadcast_to(lm["ids"], logits.shape[:-1])
    return np.asarray(token_logps(jnp.asarray(logits), jnp.asarray(ids)))


def test_enumeration_is_complete_and_sums_to_one(lm):
    assert len(lm["seqs"]) == sum(3**n for n in range(U.MAX_LEN)) + 3**U.MAX_LEN
    assert len(set(lm["seqs"])) == len(lm["seqs"])
    for name in ("policy", "ref"):
        np.testing.assert_allclose(np.exp(lm["brute"][name]).sum(-1), 1.0, rtol=0, atol=ID_TOL)
    assert abs(np.exp(lm["brute"]["prior"]).sum() - 1.0) < ID_TOL


def test_sequence_logprob_from_token_logprobs(lm):
    """S^π(y) = Σ_t m_t log π(y_t|y_<t) (OUR token_logps + seq_sum) equals the tree walk."""
    for name in ("policy", "ref"):
        per_token = _token_logps(lm, name)  # [X, N, T]
        s = np.asarray(seq_sum(jnp.asarray(per_token), jnp.asarray(lm["mask"])[None]))
        np.testing.assert_allclose(s, lm["brute"][name], rtol=0, atol=ID_TOL)


def test_seqkl_chain_rule(lm):
    """SeqKL(y) = Σ_t KL_t(π_ref‖π_θ) from logits; E_{y∼π_ref} SeqKL(y) = sequence-level KL."""
    ref_logits, logits = (jnp.asarray(lm["logits"][k]) for k in ("ref", "policy"))
    kl_t = np.asarray(token_kl(ref_logits, logits))
    p_ref = U.softmax(lm["logits"]["ref"])
    kl_numpy = np.sum(p_ref * (np.log(p_ref) - U.log_softmax(lm["logits"]["policy"])), -1)
    np.testing.assert_allclose(kl_t, kl_numpy, rtol=0, atol=ID_TOL)
    seqkl = np.asarray(seq_sum(jnp.asarray(kl_t), jnp.asarray(lm["mask"])[None]))  # [X, N]
    p_seq = np.exp(lm["brute"]["ref"])
    kl_seq = np.sum(p_seq * (lm["brute"]["ref"] - lm["brute"]["policy"]), -1)
    np.testing.assert_allclose(np.sum(p_seq * seqkl, -1), kl_seq, rtol=0, atol=ID_TOL)
    assert np.all(kl_seq > 0)


def _pairs(lm, x, seed=22):
    """Each sequence paired with a random other one: TokenInputs on [N, 2, T] for prompt x."""
    perm = np.random.default_rng(seed).permutation(len(lm["seqs"]))
    pair = lambda a: jnp.asarray(np.stack([a, a[perm]], axis=1))
    inputs = TokenInputs(
        policy=pair(_token_logps(lm, "policy")[x]),
        mask=pair(lm["mask"]),
        reference=pair(_token_logps(lm, "ref")[x]),
        prior=pair(_token_logps(lm, "prior")),
    )
    table = lambda v: np.stack([v, v[perm]], axis=1)
    return inputs, table


PRIOR_CASES = [
    # (prior name, prior params, alpha, explicit per-sequence table of log ζ from the tree walk)
    ("reference", {}, 0.1, lambda b, n: b["ref"]),
    ("tempered_reference", {"temperature": 0.7}, 0.07, lambda b, n: b["ref"] / 0.7),
    ("length_tilted_reference", {"length_coef": 0.3}, 0.1, lambda b, n: b["ref"] - 3.0 * n),
    ("token_uniform", {"vocab_size": U.VOCAB}, 0.1, lambda b, n: -np.log(U.VOCAB) * n),
    ("learned", {}, 0.1, lambda b, n: b["prior"]),
]


@pytest.mark.parametrize("name,params,alpha,table_fn", PRIOR_CASES, ids=[c[0] for c in PRIOR_CASES])
def test_token_factorised_prior_equals_sequence_table(lm, name, params, alpha, table_fn):
    cfg = loss_config(name, **params)
    cfg.alpha = alpha
    validate(cfg)
    for x in range(N_X):
        inputs, pair_table = _pairs(lm, x)
        brute = {k: (v[x] if v.ndim == 2 else v) for k, v in lm["brute"].items()}
        log_zeta = pair_table(table_fn(brute, lm["lengths"]))
        got = np.asarray(PRIORS.get(name).fn(inputs, cfg))
        np.testing.assert_allclose(got, log_zeta, rtol=0, atol=1e-11)
        # The whole loss on sequence pairs equals the sequence-level MI-DPO formula.
        s_pi = pair_table(brute["policy"])
        z = alpha * ((s_pi[:, 0] - log_zeta[:, 0]) - (s_pi[:, 1] - log_zeta[:, 1]))
        assert abs(float(mipo_loss(inputs, cfg)[0]) - np.mean(-U.log_sigmoid(z))) < ID_TOL
