"""DICE's pair construction (Chen et al. 2024, arXiv 2406.09760; sail-sg/dice; mathematics §2.2).

Round t samples K responses per prompt from π_{t−1} and scores each with the length-regularised
implicit reward s̃(y) = [log π_{t−1}(y|x) − log π_{t−2}(y|x)] − α_L·len(y), which is an MI-DPO
implicit reward with the prior ζ'(y|x) = π_{t−2}(y|x)·e^{α_L len(y)}. The highest and lowest
s̃ form the pair. α_L is searched on a grid to bring the mean chosen-minus-rejected length
closest to zero (the code uses character counts and a grid over [0, 1) in steps of 0.001).
These are host-side NumPy functions: data construction for `mipo_jax.train.rounds`, not
part of the jitted loss (the loss is DPO's, prior `previous_policy`).
"""

import numpy as np


def dice_scores(logp_prev, logp_prev2, lengths, length_alpha: float) -> np.ndarray:
    """s̃ = (log π_{t−1} − log π_{t−2}) − α_L·len, elementwise."""
    return np.asarray(logp_prev) - np.asarray(logp_prev2) - length_alpha * np.asarray(lengths)


def select_pairs(scores) -> tuple[np.ndarray, np.ndarray]:
    """Per prompt (rows of ``scores [P, K]``), the indices of the best and worst response."""
    scores = np.asarray(scores)
    if scores.ndim != 2 or scores.shape[1] < 2:
        raise ValueError(f"scores must be [prompts, K >= 2]; got shape {scores.shape}")
    return np.argmax(scores, axis=1), np.argmin(scores, axis=1)


def length_gap(implicit, lengths, length_alpha) -> np.ndarray:
    """Mean len(chosen) − len(rejected) of the pairs selected at each α_L (broadcasts α_L)."""
    implicit, lengths = np.asarray(implicit, float), np.asarray(lengths, float)
    alphas = np.atleast_1d(np.asarray(length_alpha, float))
    shaped = implicit[None] - alphas[:, None, None] * lengths[None]  # [A, P, K]
    best, worst = np.argmax(shaped, axis=2), np.argmin(shaped, axis=2)
    len_best = np.take_along_axis(np.broadcast_to(lengths, shaped.shape), best[..., None], 2)
    len_worst = np.take_along_axis(np.broadcast_to(lengths, shaped.shape), worst[..., None], 2)
    return np.mean(len_best[..., 0] - len_worst[..., 0], axis=1)


def search_length_alpha(implicit, lengths, grid=None) -> tuple[float, float]:
    """α_L on ``grid`` (default [0, 1) step 0.001) minimising |mean length gap|; (α_L, gap).

    Ties go to the smallest α_L, the least regularisation.
    """
    grid = np.arange(0.0, 1.0, 0.001) if grid is None else np.asarray(grid, float)
    gaps = length_gap(implicit, lengths, grid)
    i = int(np.argmin(np.abs(gaps)))
    return float(grid[i]), float(gaps[i])
