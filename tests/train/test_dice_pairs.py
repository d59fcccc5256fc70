"""DICE's pair construction: s̃ ranking and the α_L grid search (mathematics §2.2)."""

import numpy as np
import pytest

from mipo_jax.train import dice_pairs as dice


def test_scores_and_selection_follow_definition():
    rng = np.random.default_rng(0)
    prev, prev2 = rng.normal(size=(5, 4)), rng.normal(size=(5, 4))
    lengths = rng.integers(1, 50, size=(5, 4))
    s = dice.dice_scores(prev, prev2, lengths, 0.02)
    np.testing.assert_allclose(s, prev - prev2 - 0.02 * lengths)
    best, worst = dice.select_pairs(s)
    for p in range(5):
        assert s[p, best[p]] == s[p].max() and s[p, worst[p]] == s[p].min()


def test_length_alpha_search_removes_length_bias():
    # Implicit rewards that favour long answers: s = 0.05·len + noise. Regularising with
    # α_L ≈ 0.05 removes the bias; the search must find a gap at least as small as any
    # α on the grid (brute force) and much smaller than without regularisation.
    rng = np.random.default_rng(1)
    lengths = rng.integers(10, 400, size=(200, 16)).astype(float)
    implicit = 0.05 * lengths + rng.normal(scale=2.0, size=lengths.shape)
    alpha, gap = dice.search_length_alpha(implicit, lengths)
    grid = np.arange(0.0, 1.0, 0.001)
    brute = [abs(dice.length_gap(implicit, lengths, a)[0]) for a in grid]
    assert abs(gap) == pytest.approx(min(brute))
    assert abs(gap) < 0.1 * abs(dice.length_gap(implicit, lengths, 0.0)[0])
    assert 0.02 < alpha < 0.08


def test_select_pairs_rejects_bad_shape():
    with pytest.raises(ValueError, match="K >= 2"):
        dice.select_pairs(np.zeros((3, 1)))
