"""What a config's algorithm needs from the trainer, derived once from the config.

The loss's parts declare their inputs (`mipo_jax.losses.requirements`); on top of that the
objective decides: KTO always reads a reference, SFT none.

* `loss_fields`: the ``TokenInputs`` fields the step must fill;
* `needs_reference` / `live_reference`: whether the run reads a reference, and whether the
  step runs the reference model itself (else log-probs come with the batches);
* `extra_modules`: the modules trained next to the policy (SparsePO's mask net, the
  learnable prior).
"""

from mipo_jax.losses import requirements


def loss_fields(config) -> frozenset:
    """The ``TokenInputs`` fields of the paired loss (none for the other objectives)."""
    if config.objective != "paired":
        return frozenset()
    return requirements(config.loss).inputs


def needs_reference(config) -> bool:
    """Whether the run reads a reference model's log-probs (live, cached or dataset)."""
    if config.objective != "paired":
        return config.objective == "unpaired"
    return requirements(config.loss).reads_reference


def live_reference(config) -> bool:
    """Whether the step runs the reference model itself (else log-probs come with batches)."""
    return config.reference.mode == "live" and needs_reference(config)


def extra_modules(config) -> tuple[str, ...]:
    """Names of the modules trained with the policy (params keys besides ``policy``)."""
    if config.objective != "paired":
        return ()
    return requirements(config.loss).modules
