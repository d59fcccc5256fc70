"""Declared needs against the loss itself.

Every prior, f-divergence, weighting, link and term declares the ``TokenInputs`` fields it
reads (``needs=``). Here each declaration meets a trace of ``mipo_loss`` (``jax.eval_shape``):
with exactly the declared fields present the loss traces, without any one of them it fails,
and a per-token reference need rejects sequence-level reference log-probs. The derived set of
every config equals what a tracing search finds (`traced_fields`, below: trace the loss,
read which fields it asks for, repeat)
finds, and the derived reference modes and modules equal the trainer's hand-written rules.
"""

import importlib
import re

import jax
import jax.numpy as jnp
import pytest

import configs
from mipo_jax.losses import (
    check_reference_mode,
    loss_config,
    mipo_loss,
    required_inputs,
    requirements,
    validate,
)
from mipo_jax.losses.fdiv import FDIVS
from mipo_jax.losses.links import LINKS
from mipo_jax.losses.needs import REFERENCE_MODES
from mipo_jax.losses.terms import TERMS
from mipo_jax.losses.weighting import WEIGHTINGS
from mipo_jax.priors import PRIORS
from mipo_jax.registry import Registry
from mipo_jax.types import NEEDS, TokenInputs

B, T, N = 3, 5, 4
REGISTRIES = {
    "prior": PRIORS,
    "f_divergence": FDIVS,
    "weighting": WEIGHTINGS,
    "link": LINKS,
    "term": TERMS,
}
SAMPLE_FIELDS = frozenset({"prior_samples", "prior_samples_mask"})


def entries():
    return [
        pytest.param(kind, name, entry, id=f"{kind}:{name}")
        for kind, registry in REGISTRIES.items()
        for name, entry in registry.items()
    ]


def config_for(kind: str, name: str, entry):
    """A validated loss config using ``name``; every other part needs nothing."""
    cfg = loss_config(name if kind == "prior" else "uniform")
    if kind == "f_divergence":
        cfg.f_divergence = name
    elif kind == "weighting":
        cfg.weighting = name
    elif kind == "link":
        cfg.links = (name,)
    for key, default in entry.params.items():
        if kind != "prior":  # top-level keys: a link's ε, a term's weight
            cfg[key] = 0.5 if kind == "term" else default
    validate(cfg)
    return cfg


def shaped(fields, sequence_reference: bool = False) -> TokenInputs:
    """Abstract inputs with exactly ``fields`` (besides policy and mask) present."""
    pair = jax.ShapeDtypeStruct((B, 2, T), jnp.float32)
    samples = jax.ShapeDtypeStruct((N, T), jnp.float32)
    present = {f: samples if f.startswith("prior_samples") else pair for f in fields}
    if sequence_reference and "reference" in present:
        present["reference"] = jax.ShapeDtypeStruct((B, 2), jnp.float32)
    return TokenInputs(policy=pair, mask=pair, **present)


def traces(cfg, inputs) -> bool:
    try:
        jax.eval_shape(lambda a: mipo_loss(a, cfg), inputs)
    except ValueError:
        return False
    return True


def test_the_base_parts_need_nothing():
    """The parts :func:`config_for` fills in around an entry read no optional field."""
    assert required_inputs(loss_config("uniform")) == frozenset()


@pytest.mark.parametrize("kind, name, entry", entries())
def test_declarations_match_a_trace_of_the_loss(kind, name, entry):
    cfg = config_for(kind, name, entry)
    declared = frozenset(NEEDS[word].field for word in entry.needs)
    assert required_inputs(cfg) == declared
    assert traces(cfg, shaped(declared)), f"{kind} {name!r} reads more than it declares"
    for field in declared:
        assert not traces(cfg, shaped(declared - {field})), f"{kind} {name!r} never reads {field}"
    if "reference" in declared:  # a summed reference serves exactly the 'reference' word
        per_token = "reference_tokens" in entry.needs
        assert traces(cfg, shaped(declared, sequence_reference=True)) != per_token


def test_every_word_of_the_vocabulary_is_used():
    used = {w for registry in REGISTRIES.values() for _, e in registry.items() for w in e.needs}
    assert used == set(NEEDS)


def test_an_unknown_need_is_rejected_at_registration():
    with pytest.raises(ValueError, match="'logits'.*mipo_jax.types.NEEDS"):
        Registry("prior").register("x", needs=("logits",))


# ------------------------------------------------------------------------ every config


def paired_configs():
    out = []
    for name in configs.names():
        config = importlib.import_module(f"configs.{name}").get_config("tiny")
        if config.objective == "paired":
            out.append(pytest.param(config, id=name))
    return out


@pytest.mark.parametrize("config", paired_configs())
def test_derived_inputs_equal_the_tracing_search(config):
    """``traced_fields`` leaves out the policy samples' fields (they come with ``prior``);
    the declarations name them, exactly when the MI term is on."""
    derived = required_inputs(config.loss)
    assert derived - SAMPLE_FIELDS == traced_fields(config.loss)
    assert (SAMPLE_FIELDS <= derived) == bool(config.loss.mi_weight)


@pytest.mark.parametrize("config", paired_configs())
def test_reference_modes_and_modules_equal_the_trainers_rules(config):
    """Against ``mipo_jax.train.checks.validate`` (which reference modes it accepts) and the
    modules the trainer builds for the learnable prior and SparsePO."""
    from mipo_jax.train import checks

    req = requirements(config.loss)
    moving = "ref_sync" in config or "rounds" in config  # the trainer's own reasons for 'live'
    for mode in REFERENCE_MODES:
        config.reference.mode = mode
        try:
            checks.validate(config)
            accepted = True
        except ValueError:
            accepted = False
        ours = mode in req.reference_modes
        assert accepted == (ours and not (moving and mode != "live")), mode
        if not ours:
            with pytest.raises(ValueError, match=f"reference.mode={mode!r}: prior"):
                check_reference_mode(config.loss, mode)
        else:
            check_reference_mode(config.loss, mode)
    prior = config.loss.prior.name
    expected = {"sparse_masks": ("mask_net",), "learned": ("prior",)}.get(prior, ())
    assert req.modules == expected


def test_requirements_of_a_few_setups():
    tdpo = loss_config("sequential_kl")
    req = requirements(tdpo)
    assert req.inputs == {"reference", "kl"} and req.reference_modes == ("live",)
    assert req.full_vocab == {"kl"} and req.modules == () and req.reads_reference
    wpo = loss_config("uniform")
    wpo.weighting = "wpo"
    req = requirements(wpo)
    assert req.inputs == {"logsumsq"} and not req.reads_reference
    assert req.reference_modes == REFERENCE_MODES and req.full_vocab == {"logsumsq"}
    lddpo = loss_config("length_desensitized")
    assert requirements(lddpo).reference_modes == ("live", "cached")
    with pytest.raises(ValueError, match="prior 'length_desensitized' needs per-token reference"):
        check_reference_mode(lddpo, "dataset")
    sparse = loss_config("sparse_masks")
    sparse.l1_mask_u = 0.1
    req = requirements(sparse)
    assert req.modules == ("mask_net",) and req.reference_modes == ("live",)
    learned = loss_config("learned")
    learned.mi_weight = 1.0
    assert requirements(learned).inputs == {"prior"} | SAMPLE_FIELDS
    with pytest.raises(ValueError, match="choose one of: live, cached, dataset"):
        check_reference_mode(tdpo, "frozen")


_MISSING = re.compile(r"needs TokenInputs field\(s\) \[([^\]]*)\]")
OPTIONAL_FIELDS = ("reference", "kl", "token_weights", "mask_u", "logsumsq", "prior")


def traced_fields(loss_cfg) -> frozenset:
    """The ``TokenInputs`` fields ``mipo_loss`` reads under ``loss_cfg``, found by tracing.

    Traces the loss (shapes only) with the fields found so far and adds the ones it asks
    for. ``mask_d`` and the prior samples follow from ``mask_u`` and ``prior``.
    """
    shape = jax.ShapeDtypeStruct((2, 2, 3), jnp.float32)
    fields: set[str] = set()
    for _ in range(len(OPTIONAL_FIELDS) + 1):
        extra = {f: jnp.zeros(shape.shape) for f in fields}
        if "prior" in fields:
            extra.update(prior_samples=jnp.zeros((2, 3)), prior_samples_mask=jnp.ones((2, 3)))
        args = TokenInputs(policy=jnp.zeros(shape.shape), mask=jnp.ones(shape.shape), **extra)
        try:
            jax.eval_shape(lambda a: mipo_loss(a, loss_cfg), args)
            return frozenset(fields)
        except ValueError as err:
            found = _MISSING.search(str(err))
            if not found:
                raise
            names = {n.strip(" '\"") for n in found.group(1).split(",")}
            names -= {"prior_samples", "prior_samples_mask"}
            if not names - fields:
                raise
            fields |= names
    raise RuntimeError(f"could not resolve the loss's inputs: {sorted(fields)}")
