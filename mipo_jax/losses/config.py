"""The loss section of a config: defaults and validation with messages that list choices.

An algorithm is ``prior`` + ``normalize`` + ``f_divergence`` + ``links``/``link_weights`` +
``weighting`` + extra-term weights; ``configs/<algorithm>.py`` set these to the original
paper's or code's defaults (mathematics §2).
"""

import ml_collections

from mipo_jax.losses.fdiv import FDIVS, IDENTITY
from mipo_jax.losses.links import DIFFERENCE_LINKS, LINKS
from mipo_jax.losses.terms import TERMS
from mipo_jax.losses.weighting import WEIGHTINGS
from mipo_jax.priors import PRIORS

NORMALIZE = ("sum", "mean")


def loss_config(prior: str = "reference", **prior_params) -> ml_collections.ConfigDict:
    """Defaults: DPO (sigmoid link, reference prior, alpha = β = 0.1, summed log-probs)."""
    entry = PRIORS.get(prior)
    unknown = set(prior_params) - set(entry.params)
    if unknown:
        raise ValueError(
            f"prior {prior!r} takes {sorted(entry.params) or 'no parameters'}; "
            f"got {sorted(unknown)}"
        )
    return ml_collections.ConfigDict(
        dict(
            alpha=0.1,  # DPO's β; MI-DPO's α = 1/β_MI (mathematics §1.2)
            normalize="sum",  # "mean": divide log π − log ζ by |y| (SimPO/IPO view)
            margin=0.0,  # subtracted from the logit z (SimPO's γ)
            prior=dict(name=prior, **{**entry.params, **prior_params}),
            links=("sigmoid",),
            link_weights=(1.0,),
            label_smoothing=0.0,  # cDPO / robust / EXO / AOT ε
            discopop_tau=0.05,
            f_divergence="reverse_kl",
            f_alpha=0.5,
            trl_order=True,  # 'mean' + a score: g(ρ)/|y| as TRL; False: g(ρ/|y|) (mipo.py)
            weighting="none",
            sft_weight=0.0,  # NLL of the chosen response (RPO, CPO, ORPO, TRL "sft")
            l1_mask_u=0.0,  # SparsePO λ_u
            l1_mask_d=0.0,  # SparsePO λ_d
            mi_weight=0.0,  # mutual-information term of a learnable prior (mathematics §1.5)
        )
    )


def _choice(value, allowed, key):
    if value not in allowed:
        raise ValueError(
            f"loss.{key}={value!r} is not allowed; choose one of: {', '.join(allowed)}"
        )


def _check(cond: bool, key: str, value, rule: str):
    if not cond:
        raise ValueError(f"loss.{key}={value!r} is out of range: {rule}")


def validate(cfg) -> None:
    """Reject unknown names and out-of-range values, naming the key and the allowed values."""
    _choice(cfg.prior.name, PRIORS.names(), "prior.name")
    allowed = set(PRIORS.get(cfg.prior.name).params) | {"name"}
    extra = set(cfg.prior.keys()) - allowed
    if extra:
        raise ValueError(
            f"loss.prior has key(s) {sorted(extra)} that prior {cfg.prior.name!r} does not "
            f"take; it takes: {sorted(allowed - {'name'}) or 'nothing'}"
        )
    _choice(cfg.normalize, NORMALIZE, "normalize")
    _choice(cfg.f_divergence, FDIVS.names(), "f_divergence")
    _choice(cfg.weighting, WEIGHTINGS.names(), "weighting")
    links = tuple(cfg.links)
    _check(len(links) > 0, "links", links, "at least one link")
    for name in links:
        _choice(name, LINKS.names(), "links")
    _check(
        len(tuple(cfg.link_weights)) == len(links),
        "link_weights",
        cfg.link_weights,
        f"one weight per link ({len(links)})",
    )
    _check(cfg.alpha > 0, "alpha", cfg.alpha, "must be > 0")
    _check(0.0 <= cfg.label_smoothing < 0.5, "label_smoothing", cfg.label_smoothing, "in [0, 0.5)")
    _check_link_combinations(cfg, links)
    order = cfg.get("trl_order", True)  # configs older than the key: TRL's order
    _check(isinstance(order, bool), "trl_order", order, "True or False")
    if "exo_pair" in links:
        _check(
            cfg.label_smoothing > 0,
            "label_smoothing",
            cfg.label_smoothing,
            "exo_pair needs ε > 0 (1e-3 recommended)",
        )
    _check(cfg.discopop_tau > 0, "discopop_tau", cfg.discopop_tau, "must be > 0")
    if cfg.f_divergence == "alpha_divergence":
        _check(cfg.f_alpha != 1.0, "f_alpha", cfg.f_alpha, "must differ from 1")
    for _, term in TERMS.items():
        for key in term.params:
            _check(cfg[key] >= 0, key, cfg[key], "must be >= 0")
    _check_prior_params(cfg.prior)


def _check_link_combinations(cfg, links) -> None:
    """What TRL 1.16 rejects (f-divergences, weighting), and a smoothing no link reads."""
    readers = [n for n in LINKS.names() if "label_smoothing" in LINKS.get(n).params]
    if cfg.label_smoothing and not set(readers) & set(links):
        raise ValueError(
            f"loss.label_smoothing={cfg.label_smoothing!r} is read by none of loss.links="
            f"{links} (TRL's sigmoid has no label smoothing); links that read it: "
            f"{', '.join(readers)} (cDPO is links=('cdpo',))"
        )
    pointwise = [n for n in links if n not in DIFFERENCE_LINKS]
    if cfg.f_divergence != IDENTITY and pointwise:
        raise ValueError(
            f"loss.f_divergence={cfg.f_divergence!r} applies only to links on the chosen-minus-"
            f"rejected score difference ({', '.join(DIFFERENCE_LINKS)}), not to {pointwise}: "
            "the f-DPO reparameterisation leaves a log Z(x) term that cancels only in that "
            "difference (TRL 1.16 rejects it too); use f_divergence='reverse_kl'"
        )
    sorted_links = [n for n in links if n in ("aot", "aot_unpaired")]
    if cfg.weighting != "none" and sorted_links:
        raise ValueError(
            f"loss.weighting={cfg.weighting!r} cannot weight {sorted_links}: their losses belong "
            "to sorted positions, not to pairs (TRL 1.16 rejects it too); use weighting='none'"
        )


def _check_prior_params(p) -> None:
    rules = {
        "temperature": (lambda v: v > 0, "must be > 0"),
        "ld_alpha": (lambda v: 0.0 <= v <= 1.0, "in [0, 1]"),
        "vocab_size": (lambda v: v >= 1, "must be >= 1"),
        "kl_coef": (lambda v: v >= 0, "must be >= 0"),
        "dpop_lambda": (lambda v: v >= 0, "must be >= 0"),
        "length_coef": (lambda v: True, ""),
        "gamma": (lambda v: True, ""),
    }
    for key, value in p.items():
        if key in rules and not rules[key][0](value):
            raise ValueError(f"loss.prior.{key}={value!r} is out of range: {rules[key][1]}")
