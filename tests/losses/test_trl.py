"""``mipo_loss`` against TRL 1.16's ``DPOTrainer`` where TRL users will compare numbers.

The reference is ``tests/reference/trl.py``, a float64 NumPy restatement of
``trl/trainer/dpo_trainer.py`` (``trl==1.16.0``): ``__init__``'s checks and
``_compute_loss``. Each test quotes the lines it matches. TRL loss types map to our parts:
``sigmoid_norm`` is ``sigmoid`` with ``normalize='mean'``, ``ipo`` uses ``normalize='mean'``,
``sft`` is ``sft_weight``, ``use_weighting`` is ``weighting='wpo'``, ``beta`` is ``alpha``.
"""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from mipo_jax.losses import loss_config, mipo_loss, validate
from mipo_jax.losses.fdiv import FDIVS
from mipo_jax.types import TokenInputs
from tests.reference import trl as R

TOL = 1e-10
B, T = 5, 7
BETA = 0.3
POINTWISE = ("nca_pair", "bco_pair", "sppo_hard", "apo_zero", "apo_down", "aot", "aot_unpaired")
DIFFERENCE = ("sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust", "discopop")
EPS = {"exo_pair": 1e-3, "robust": 0.1, "aot": 0.1, "aot_unpaired": 0.1}


@pytest.fixture(autouse=True)
def x64():
    with jax.enable_x64(True):
        yield


@pytest.fixture(scope="module")
def batch():
    """Per-token log-probs with uneven completion lengths (1..T), left-padded prompts."""
    rng = np.random.default_rng(7)
    lengths = rng.integers(1, T + 1, (B, 2))
    lengths[0] = (2, T)  # one pair of very unequal lengths
    mask = (np.arange(T) >= T - lengths[..., None]).astype(float)
    return dict(
        policy=-rng.exponential(1.0, (B, 2, T)),
        reference=-rng.exponential(1.0, (B, 2, T)),
        mask=mask,
        logsumsq=-rng.exponential(0.5, (B, 2, T)),
    )


def ours(loss_types, weights=None, *, fdiv="reverse_kl", eps=0.0, wpo=False, **overrides):
    """Our loss config for a TRL ``loss_type`` list (one length normalisation for all)."""
    weights = list(weights or [1.0] * len(loss_types))
    cfg = loss_config("reference")
    cfg.alpha = BETA
    cfg.f_divergence = fdiv
    cfg.label_smoothing = eps
    cfg.weighting = "wpo" if wpo else "none"
    links = [(t, w) for t, w in zip(loss_types, weights, strict=True) if t != "sft"]
    cfg.sft_weight = dict(zip(loss_types, weights, strict=True)).get("sft", 0.0)
    cfg.links = tuple("sigmoid" if t == "sigmoid_norm" else t for t, _ in links)
    cfg.link_weights = tuple(w for _, w in links)
    if any(t in ("ipo", "sigmoid_norm") for t, _ in links):
        cfg.normalize = "mean"
    for key, value in overrides.items():
        cfg[key] = value
    validate(cfg)
    return cfg


def run_ours(cfg, batch):
    inputs = TokenInputs(**{k: jnp.asarray(v) for k, v in batch.items()})
    loss, metrics = mipo_loss(inputs, cfg)
    return float(loss), {k: float(m.value) for k, m in metrics.items()}


def run_trl(batch, loss_types, weights=None, *, fdiv="reverse_kl", eps=0.0, wpo=False):
    return R.compute_loss(
        batch["policy"],
        batch["reference"],
        batch["mask"],
        loss_types=loss_types,
        beta=BETA,
        loss_weights=weights,
        f_divergence_type=fdiv,
        label_smoothing=eps,
        logsumsq=batch["logsumsq"] if wpo else None,
    )


def assert_matches_trl(batch, loss_types, weights=None, **kw):
    trl_loss, trl_metrics = run_trl(batch, loss_types, weights, **kw)
    loss, metrics = run_ours(ours(loss_types, weights, **kw), batch)
    assert abs(loss - trl_loss) < TOL * (1 + abs(trl_loss)), (loss, trl_loss)
    for key, value in trl_metrics.items():
        assert abs(metrics[key] - value) < TOL, key
    return metrics


# ------------------------------------------------------------------------ f-divergences


@pytest.mark.parametrize("fdiv", ["forward_kl", "js_divergence", "alpha_divergence"])
@pytest.mark.parametrize("loss_type", POINTWISE)
def test_f_divergence_only_with_links_on_the_score_difference(loss_type, fdiv):
    """TRL 1.16 ``DPOTrainer.__init__`` rejects a score on the pointwise losses:

        # The f-DPO reparameterization leaves a β·log Z(x) term that only cancels in the
        # chosen-rejected reward difference, so the other losses have no valid f-divergence
        # generalization.
        f_divergence_loss_types = {"sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair",
                                   "robust", "discopop", "sft"}
        if self.f_divergence_type != "reverse_kl" and not set(self.loss_types) <=
                f_divergence_loss_types:
            raise ValueError(...)

    (``_compute_loss`` itself would feed them the raw ``chosen_logratios``, a path TRL never
    reaches.) We used to apply the score g(ρ) to them; now validation rejects them too.
    """
    with pytest.raises(ValueError, match="f_divergence"):
        R.check([loss_type], fdiv)
    with pytest.raises(ValueError, match=f"f_divergence={fdiv!r}.*{loss_type}"):
        ours([loss_type], fdiv=fdiv, eps=EPS.get(loss_type, 0.0))
    with pytest.raises(ValueError, match=loss_type):  # also inside a mixture
        ours(["sigmoid", loss_type], fdiv=fdiv, eps=EPS.get(loss_type, 0.0))


@pytest.mark.parametrize("fdiv", FDIVS.names())
@pytest.mark.parametrize("loss_type", ["ipo", "sigmoid_norm"])
def test_score_first_then_length_for_ipo_and_sigmoid_norm(batch, loss_type, fdiv):
    """TRL 1.16 ``_compute_loss`` takes the score of the summed log-ratio, then divides by the
    length (``ipo``; ``sigmoid_norm`` alike, with ``-F.logsigmoid(self.beta * delta)``):

        chosen_logratios = chosen_logps - ref_chosen_logps
        ...
        elif self.f_divergence_type == "forward_kl":
            chosen_scores = 1 - torch.exp(-chosen_logratios)
        elif self.f_divergence_type == "js_divergence":
            chosen_scores = math.log(2) + F.logsigmoid(chosen_logratios)
        ...
        chosen_avg_score = chosen_scores / chosen_mask.sum(dim=1).clamp(min=1.0)
        rejected_avg_score = rejected_scores / rejected_mask.sum(dim=1).clamp(min=1.0)
        ipo_delta = chosen_avg_score - rejected_avg_score
        per_sequence_loss = (ipo_delta - 1 / (2 * self.beta)) ** 2

    ``loss.trl_order=True`` (the default) does the same, with TRL's constants (g(0) = 0);
    ``trl_order=False`` scores the length-normalised log-ratio, g(ρ/|y|) (MI-DPO on π^{1/|y|}).
    """
    assert_matches_trl(batch, [loss_type], fdiv=fdiv)
    mi_loss, _ = run_ours(ours([loss_type], fdiv=fdiv, trl_order=False), batch)
    n = batch["mask"].sum(-1)
    rho = ((batch["policy"] - batch["reference"]) * batch["mask"]).sum(-1)
    g = R.scores(rho / n, fdiv)
    h = g[:, 0] - g[:, 1]
    per_pair = (h - 1 / (2 * BETA)) ** 2 if loss_type == "ipo" else -R.log_sigmoid(BETA * h)
    assert abs(mi_loss - np.mean(per_pair)) < TOL * (1 + abs(mi_loss))
    trl_loss, _ = run_trl(batch, [loss_type], fdiv=fdiv)
    assert (abs(mi_loss - trl_loss) > 1e-6) == (fdiv != "reverse_kl")


@pytest.mark.parametrize("fdiv", FDIVS.names())
@pytest.mark.parametrize("loss_type", [t for t in DIFFERENCE if t not in ("ipo", "sigmoid_norm")])
def test_scores_on_summed_log_ratios(batch, loss_type, fdiv):
    """The other links on the score difference: ``delta_score = chosen_scores -
    rejected_scores``, e.g. ``per_sequence_loss = torch.relu(1 - self.beta * delta_score)``."""
    assert_matches_trl(batch, [loss_type], fdiv=fdiv, eps=EPS.get(loss_type, 0.0))


def test_alpha_divergence_clamps_its_exponent_as_trl(batch):
    """``t_chosen_float = torch.clamp(t_chosen.float(), max=clamp_max)`` with ``clamp_max``
    80 in float32: a log-ratio far below zero (a = 0.5: t = −ρ/2 > 80) stays finite."""
    far = dict(batch, policy=batch["policy"] - 60.0)
    assert_matches_trl(far, ["sigmoid"], fdiv="alpha_divergence")
    cfg = ours(["sigmoid"], fdiv="alpha_divergence")
    with jax.enable_x64(False):  # float32, as in training
        inputs = TokenInputs(**{k: jnp.asarray(v, jnp.float32) for k, v in far.items()})
        loss, grads = jax.value_and_grad(lambda p: mipo_loss(inputs.replace(policy=p), cfg)[0])(
            inputs.policy
        )
    assert np.isfinite(float(loss)) and np.all(np.isfinite(np.asarray(grads)))


# ------------------------------------------------------------------------ label smoothing


@pytest.mark.parametrize("other", ["robust", "exo_pair", "aot", "aot_unpaired"])
def test_sigmoid_ignores_label_smoothing_in_mixtures(batch, other):
    """TRL 1.16's ``sigmoid`` has no label smoothing; ``label_smoothing`` is read by
    ``robust``, ``exo_pair``, ``aot`` and ``aot_unpaired`` only:

        if loss_type == "sigmoid":
            per_sequence_loss = -F.logsigmoid(self.beta * delta_score)
        ...
        elif loss_type == "robust":
            clean_loss_term = -(1 - self.label_smoothing) * F.logsigmoid(self.beta * delta_score)

    One global ε used to turn ``sigmoid`` into cDPO inside such a mixture."""
    eps = EPS[other]
    assert_matches_trl(batch, ["sigmoid", other], [0.7, 0.3], eps=eps)


def test_cdpo_is_its_own_link_and_smoothing_needs_a_reader(batch):
    """cDPO (−(1−ε) log σ(z) − ε log σ(−z)) is the ``cdpo`` link; ε with no link that reads
    it is an error instead of a silent plain DPO."""
    with pytest.raises(ValueError, match="label_smoothing.*cdpo"):
        ours(["sigmoid"], eps=0.1)
    cfg = ours(["sigmoid"])
    cfg.links, cfg.label_smoothing = ("cdpo",), 0.1
    validate(cfg)
    loss, _ = run_ours(cfg, batch)
    rho = ((batch["policy"] - batch["reference"]) * batch["mask"]).sum(-1)
    z = BETA * (rho[:, 0] - rho[:, 1])
    expected = np.mean(-0.9 * R.log_sigmoid(z) - 0.1 * R.log_sigmoid(-z))
    assert abs(loss - expected) < TOL


# ------------------------------------------------------------------------ metrics


@pytest.mark.parametrize(
    "loss_type, fdiv",
    [("ipo", "reverse_kl"), ("sigmoid_norm", "reverse_kl"), ("sigmoid", "js_divergence")],
)
def test_rewards_are_logged_as_trl_and_scores_beside_them(batch, loss_type, fdiv):
    """TRL 1.16 logs β·ρ on the summed log-ratios whatever the loss type and score:

        chosen_rewards = self.beta * chosen_logratios.detach()
        rejected_rewards = self.beta * rejected_logratios.detach()
        ...
        reward_accuracies = (chosen_rewards > rejected_rewards).float()
        margins = chosen_rewards - rejected_rewards

    We used to log them on the normalised score. Where the two differ (``normalize='mean'``
    or a score other than ρ) the loss's own α·score is logged as ``scores/*``."""
    metrics = assert_matches_trl(batch, [loss_type], fdiv=fdiv)
    n = batch["mask"].sum(-1) if loss_type != "sigmoid" else 1.0
    rho = ((batch["policy"] - batch["reference"]) * batch["mask"]).sum(-1)
    score = BETA * R.scores(rho, fdiv) / n
    assert abs(metrics["scores/chosen"] - np.mean(score[:, 0])) < TOL
    assert abs(metrics["scores/rejected"] - np.mean(score[:, 1])) < TOL
    assert abs(metrics["scores/margins"] - np.mean(score[:, 0] - score[:, 1])) < TOL
    accuracy = np.mean(score[:, 0] > score[:, 1])
    assert abs(metrics["scores/accuracies"] - accuracy) < TOL
    assert abs(metrics["rewards/chosen"] - np.mean(score[:, 0])) > 1e-3
    dpo_metrics = run_ours(ours(["sigmoid"]), batch)[1]
    assert not any(k.startswith("scores/") for k in dpo_metrics)  # identical: not repeated


# ------------------------------------------------------------------------ every loss type

TRL_SETUPS = (
    [pytest.param([t], None, dict(eps=EPS.get(t, 0.0)), id=t) for t in DIFFERENCE + POINTWISE]
    + [pytest.param([t], None, dict(wpo=True), id=f"{t}-wpo") for t in ("sigmoid", "bco_pair")]
    + [
        pytest.param(["sigmoid", "bco_pair", "sft"], [0.8, 0.2, 1.0], {}, id="mpo"),
        pytest.param(["sigmoid", "sft"], [1.0, 1.0], {}, id="rpo"),
        pytest.param(["sigmoid", "nca_pair", "robust"], [1.0, 0.5, 0.2], dict(eps=0.1), id="mix"),
        pytest.param(["ipo", "sft"], [1.0, 0.5], {}, id="ipo-sft"),
    ]
)


@pytest.mark.parametrize("loss_types, weights, kw", TRL_SETUPS)
def test_every_trl_loss_type_matches(batch, loss_types, weights, kw):
    """Loss and ``rewards/*``, ``logps/*`` of each TRL loss type, WPO and TRL mixtures."""
    assert_matches_trl(batch, loss_types, weights, **kw)


def test_weighting_with_sorted_losses_is_rejected_as_trl():
    """``if self.use_weighting and any(loss_type in {"aot", "aot_unpaired"} ...): raise
    NotImplementedError("WPO-style weighting is not implemented for 'aot' or 'aot_unpaired'
    because those losses sort ...")``: a sorted position's loss belongs to no pair."""
    with pytest.raises(NotImplementedError):
        R.check(["aot"], use_weighting=True)
    for link in ("aot", "aot_unpaired"):
        with pytest.raises(ValueError, match=f"weighting='wpo'.*{link}"):
            ours([link], wpo=True)


def test_trl_order_is_a_boolean_and_defaults_to_trl(batch):
    typed = ml_collections.ConfigDict({**ours(["ipo"]).to_dict(), "trl_order": "no"})
    with pytest.raises(ValueError, match="trl_order='no'.*True or False"):
        validate(typed)
    old = ours(["ipo"], fdiv="js_divergence")
    del old["trl_order"]  # a config written before the key: TRL's order
    validate(old)
    assert run_ours(old, batch) == run_ours(ours(["ipo"], fdiv="js_divergence"), batch)
