"""What a loss config reads, derived from the declarations of its parts (no tracing).

Every prior, f-divergence, weighting, link and term is registered with the batch inputs it
needs (``needs=``, words of :data:`mipo_jax.types.NEEDS`). A config's parts are its prior,
score, weighting, links and active terms; their declarations say which ``TokenInputs``
fields the trainer must fill, which reference modes can serve them, which fields come from
whole next-token distributions and which trainable modules (besides the policy) compute
them. ``tests/losses/test_needs.py`` checks every declaration against a trace of the loss.
"""

import dataclasses

from mipo_jax.losses import terms
from mipo_jax.losses.fdiv import FDIVS
from mipo_jax.losses.links import LINKS
from mipo_jax.losses.weighting import WEIGHTINGS
from mipo_jax.priors import PRIORS
from mipo_jax.types import NEEDS

REFERENCE_MODES = ("live", "cached", "dataset")


def parts(cfg) -> list[tuple[str, tuple[str, ...]]]:
    """``(part, needs)`` of every part ``cfg`` uses, e.g. ``("prior 'sequential_kl'",
    ("reference", "kl"))``."""
    chosen = [
        ("prior", PRIORS, cfg.prior.name),
        ("f_divergence", FDIVS, cfg.f_divergence),
        ("weighting", WEIGHTINGS, cfg.weighting),
        *(("link", LINKS, name) for name in cfg.links),
        *(("term", terms.TERMS, name) for name in terms.active(cfg)),
    ]
    return [(f"{kind} {name!r}", registry.get(name).needs) for kind, registry, name in chosen]


def required_inputs(cfg) -> frozenset[str]:
    """The ``TokenInputs`` fields ``mipo_loss`` reads under ``cfg`` (besides policy, mask and
    pair_valid, which every batch has)."""
    return frozenset(NEEDS[word].field for _, needs in parts(cfg) for word in needs)


@dataclasses.dataclass(frozen=True)
class Requirements:
    """What the trainer must set up for a loss config.

    Attributes:
      inputs: the ``TokenInputs`` fields to fill (:func:`required_inputs`).
      reads_reference: some part reads the reference model's log-probs (or its KL, or its
        hidden states).
      reference_modes: the reference modes that can serve every part (all of
        :data:`REFERENCE_MODES` when none reads the reference).
      full_vocab: fields computed from whole next-token distributions (``kl``, ``logsumsq``).
      modules: trainable modules besides the policy that compute inputs (``mask_net``,
        ``prior``), sorted.
    """

    inputs: frozenset[str]
    reads_reference: bool
    reference_modes: tuple[str, ...]
    full_vocab: frozenset[str]
    modules: tuple[str, ...]


def requirements(cfg) -> Requirements:
    """The set-up ``cfg`` needs, from the declarations of its parts."""
    words = {word for _, needs in parts(cfg) for word in needs}
    uses = [NEEDS[w] for w in words if NEEDS[w].reference]
    modes = tuple(m for m in REFERENCE_MODES if all(m in n.reference for n in uses))
    return Requirements(
        inputs=required_inputs(cfg),
        reads_reference=bool(uses),
        reference_modes=modes,
        full_vocab=frozenset(NEEDS[w].field for w in words if NEEDS[w].full_vocab),
        modules=tuple(sorted({NEEDS[w].module for w in words} - {""})),
    )


def check_reference_mode(cfg, mode: str) -> None:
    """Raise a ``ValueError`` naming the part and what it needs when ``reference.mode=mode``
    cannot serve ``cfg``."""
    if mode not in REFERENCE_MODES:
        raise ValueError(f"reference.mode={mode!r}; choose one of: {', '.join(REFERENCE_MODES)}")
    for part, needs in parts(cfg):
        for word in needs:
            need = NEEDS[word]
            if need.reference and mode not in need.reference:
                raise ValueError(
                    f"reference.mode={mode!r}: {part} needs {need.what} ({word!r}), which only "
                    f"reference.mode={' or '.join(repr(m) for m in need.reference)} gives"
                )
