"""Random float64 inputs of the mathematics §2 harness: B = 4 pairs, T = 7 tokens, V = 11 words.

Seed 0 uses the harness's lengths (chosen 7, 5, 3, 6; rejected 4, 7, 2, 6: one pair with
|y_w| = |y_l|, one with |y_w| < |y_l|) and prompt offsets 0, 0, 2, 1, so completions do not
all start at t = 0. Other seeds draw lengths and offsets at random. Tokens, weights and
masks at prompt and padding positions are random too: they must not matter.
"""

import dataclasses

import numpy as np

B, T, V = 4, 7, 11
SPEC_LENGTHS = ((7, 4), (5, 7), (3, 2), (6, 6))  # (|y_w|, |y_l|) per pair
SPEC_OFFSETS = (0, 0, 2, 1)


@dataclasses.dataclass(frozen=True)
class Fixture:
    """Raw inputs; arrays are float64 except the int ids ``y``."""

    Lp: np.ndarray  # policy logits [B, 2, T, V]
    Lr: np.ndarray  # reference logits [B, 2, T, V]
    Lprev: np.ndarray  # previous iterate's logits (DICE, SPIN) [B, 2, T, V]
    y: np.ndarray  # token ids [B, 2, T]
    m: np.ndarray  # completion masks [B, 2, T]
    w: np.ndarray  # TIS-DPO token weights in [0.7, 1.3] [B, 2, T]
    mu: np.ndarray  # SparsePO reward mask m^u > 0 [B, 2, T]
    md: np.ndarray  # SparsePO KL mask m^d > 0 [B, 2, T]

    def arrays(self) -> dict[str, np.ndarray]:
        """The differentiable inputs by name."""
        return dict(Lp=self.Lp, Lr=self.Lr, Lprev=self.Lprev, mu=self.mu, md=self.md)


def _masks(rng, seed):
    if seed == 0:
        lens, offsets = np.array(SPEC_LENGTHS), np.array(SPEC_OFFSETS)
    else:
        lens = rng.integers(1, T + 1, size=(B, 2))
        offsets = rng.integers(0, T - lens.max(axis=1) + 1)
    t = np.arange(T)
    start = offsets[:, None, None]
    return ((t >= start) & (t < start + lens[..., None])).astype(np.float64)


def make(seed: int = 0) -> Fixture:
    """The harness inputs for ``seed``; the policy is the reference plus noise of scale 1."""
    rng = np.random.default_rng(seed)
    Lr = rng.normal(size=(B, 2, T, V))
    Lp = Lr + rng.normal(size=(B, 2, T, V))
    Lprev = Lr + 0.5 * rng.normal(size=(B, 2, T, V))
    return Fixture(
        Lp=Lp,
        Lr=Lr,
        Lprev=Lprev,
        y=rng.integers(0, V, size=(B, 2, T)),
        m=_masks(rng, seed),
        w=rng.uniform(0.7, 1.3, size=(B, 2, T)),
        mu=rng.uniform(0.05, 1.5, size=(B, 2, T)),
        md=rng.uniform(0.05, 1.5, size=(B, 2, T)),
    )
