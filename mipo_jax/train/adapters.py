"""LoRA training: the policy as frozen base weights plus trained adapters (``model.lora``).

With ``model.lora.rank > 0`` (the adapters: `mipo_jax.models.lora`):

* the train state's ``params["policy"]`` are the adapters only, so the optimiser state and
  every checkpoint hold adapters (with the step, RNG and optimiser moments: all an exact
  resume needs); the base weights are rebuilt from ``model.init`` when a run resumes;
* the base weights stay outside the state, frozen and never donated: the train step gets
  them as its reference argument and runs the policy on base ∪ adapters; the live
  reference *is* the base (the same arrays under the base model's graph: adapters off),
  never a second copy;
* what runs the policy outside the step (evaluation, policy samples, the HF export) takes
  `LoraPolicy.params(adapters)`, the adapted model's parameters (shared arrays, no copy).

DICE/SPIN rounds and TR-DPO's reference sync move the reference away from the base, so
they are refused with LoRA.
"""

import dataclasses
import math
from typing import Any

import jax
from flax import nnx

from mipo_jax.models import lora
from mipo_jax.train import state as st

_STREAM = 0x4C6F5241  # the adapters' random stream, apart from the model's initialisation


def validate(config) -> None:
    """Raise ``ValueError`` naming the bad ``model.lora`` key (no JAX work)."""
    section = config.model.get("lora")
    if section is None or int(section.rank) == 0:
        return
    if float(section.alpha) <= 0:
        raise ValueError(f"model.lora.alpha={section.alpha} must be > 0")
    lora.LoraSettings.from_config(section)
    for name, what in (("rounds", "DICE/SPIN rounds"), ("ref_sync", "TR-DPO's reference sync")):
        if name in config:
            raise ValueError(
                f"model.lora.rank={section.rank}: {what} move the reference away from the "
                "base weights, but with LoRA the reference is the base; set model.lora.rank=0"
            )


@dataclasses.dataclass
class LoraPolicy:
    """The frozen base, the adapted model's graph and the adapters (initial values).

    ``base``: the base model (`mipo_jax.train.modules.Built`: graph, params, shardings);
    ``graph``: the adapted model's GraphDef; ``adapters``/``shardings``: the adapters and
    theirs; ``full_shardings``: those of `params` (base, adapters, dropout state).
    """

    base: Any
    graph: Any
    adapters: dict
    shardings: dict
    full_shardings: dict
    adapted: lora.Adapted

    def params(self, adapters: dict) -> dict:
        """The adapted model's parameters for ``graph`` (no dropout; arrays shared)."""
        return lora.combine(self.base.params, adapters, self.adapted)

    def view(self, state):
        """``state`` with ``params["policy"]`` the adapted model's (for `graph`)."""
        return state.replace(params={**state.params, "policy": self.params(state.params["policy"])})


def build(policy, m, mesh, seed: int, *, abstract: bool = False) -> LoraPolicy | None:
    """Adapters on ``policy`` (a `Built`) as ``m.lora`` says; None when ``m.lora.rank`` is 0.

    ``abstract=True``: ``policy.params`` may be ``ShapeDtypeStruct``s and the adapters are
    returned as ``ShapeDtypeStruct``s with their shardings (memory plans, AOT compilation).
    """
    settings = lora.LoraSettings.from_config(m.get("lora"))
    if settings is None:
        return None
    key = jax.random.fold_in(jax.random.key(seed), _STREAM)
    found = []

    def make(params):
        model = nnx.merge(policy.graph, params)
        found.append(lora.attach(model, settings, key))
        return model

    def init(params):
        return lora.split_params(nnx.to_pure_dict(nnx.split(make(params))[1]))[1]

    graph, state = nnx.split(nnx.eval_shape(make, policy.params))
    full_sh = st.param_shardings(state, mesh)
    sh = lora.split_params(full_sh)[1]
    if abstract:
        adapters = st.abstract(jax.eval_shape(init, policy.params), sh)
    elif mesh.size == 1:
        adapters = jax.device_put(init(policy.params), sh)
    else:  # straight into the sharded layout
        with jax.set_mesh(mesh):
            adapters = jax.jit(init, out_shardings=sh)(policy.params)
    return LoraPolicy(policy, graph, adapters, sh, full_sh, found[0])


def describe(p: LoraPolicy) -> str:
    n, base = (
        lora.count(p.adapters),
        sum(math.prod(x.shape) for x in jax.tree.leaves(p.base.params)),
    )
    s = p.adapted.settings
    return (
        f"LoRA r={s.rank} α={s.alpha:g} dropout={s.dropout:g} on {','.join(s.targets)}: "
        f"{n / 1e6:.3f}M adapter parameters ({100 * n / base:.2f}% of the base's {base / 1e6:.2f}M)"
    )


class ViewedTransform:
    """A batch transform that reads the policy, given the adapted model's parameters."""

    def __init__(self, transform, policy: LoraPolicy):
        self.transform, self.policy = transform, policy

    def __call__(self, batch, state, step):
        return self.transform(batch, self.policy.view(state), step)


class ViewedEvaluator:
    """`mipo_jax.train.evaluation.Evaluator` run on the adapted model's parameters."""

    def __init__(self, evaluator, policy: LoraPolicy):
        self.evaluator, self.policy = evaluator, policy

    @property
    def enabled(self) -> bool:
        return self.evaluator.enabled

    def __call__(self, state) -> dict[str, float]:
        return self.evaluator(self.policy.view(state))


def evaluator_parts(p: LoraPolicy, spec, shardings, live: bool):
    """(spec, state shardings, reference, its shardings) for an evaluator that sees
    `LoraPolicy.view` states: the policy is ``p.graph`` on the adapted model's parameters,
    and the reference the same graph with the initial adapters (B = 0: equal to the base)."""
    initial = p.params(jax.tree.map(lambda x: x.copy(), p.adapters))  # the state's are donated
    spec = dataclasses.replace(
        spec,
        graphs=(("policy", p.graph),) + tuple(g for g in spec.graphs if g[0] != "policy"),
        ref_graph=p.graph if live else None,
        lora=None,
    )
    shardings = shardings.replace(params={**shardings.params, "policy": p.full_shardings})
    return spec, shardings, initial, p.full_shardings
