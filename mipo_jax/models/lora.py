"""LoRA adapters on a `CausalLM`'s projections, added from outside the model (module surgery).

For every targeted projection ``y = x·W`` (``W [*in, *out]``) the adapted model computes

    y = x·W + (α / r) · (drop(x)·A)·B,     A [*in, r] ~ U(±1/√fan_in),  B [r, *out] = 0

(Hu et al. 2021, eq. 3; A's range and the zero B are PEFT's defaults, so an adapted model
starts equal to its base, and ``drop`` is dropout on the adapter's input only, as PEFT's).

    adapted = attach(model, LoraSettings(rank=8, alpha=16.0), key)   # in place
    graph, state = nnx.split(model)
    base, adapters = split_params(nnx.to_pure_dict(state))           # pure dicts
    model = nnx.merge(graph, combine(base, adapters, adapted))       # no copies
    plain = merged(model)       # a CausalLM with W + (α/r)·A·B: what HF export writes

`attach` finds the model's `Dense` projections named in ``targets`` (``q k v o`` of the
attention, ``gate up down`` of the MLP), changes each one's class to `LoraDense` (the same
module plus the low-rank term in ``__call__``) and gives it ``lora_a`` and ``lora_b``
(`nnx.LoRAParam`) beside its kernel. The model's code is not touched and its parameters
keep their paths, so the adapted model's state is the base model's state plus the adapters,
and the base alone is exactly the un-adapted model's (the reference "with adapters off").
Projections inside the stacked layers get stacked adapters (leading ``layers`` axis, like
their kernels); the adapters take their kernel's logical axis names (A its input axes, B
its output axes, the rank axis replicated), so they are sharded like the base weights.
Adapters are float32 (or wider) whatever the base's parameter dtype: a frozen base may be
stored in bfloat16 while its adapters train in float32.

With ``dropout > 0`` each adapted projection also holds `LoraDropout` variables (a PRNG
key and the keep probability, per layer): they are not parameters, `combine` fills them
for each forward (a key per step for training, keep = 1, i.e. no dropout, otherwise).
"""

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from mipo_jax.models.layers import Dense

TARGETS = ("q", "k", "v", "o", "gate", "up", "down")
ADAPTER_KEYS = ("lora_a", "lora_b")
_DROPOUT_KEYS = ("lora_key", "lora_keep")


@dataclasses.dataclass(frozen=True)
class LoraSettings:
    """``rank`` r, ``alpha`` α (the update is scaled by α/r), projections, input dropout."""

    rank: int
    alpha: float = 16.0
    targets: tuple[str, ...] = TARGETS
    dropout: float = 0.0

    def __post_init__(self):
        bad = [t for t in self.targets if t not in TARGETS]
        if bad or not self.targets:
            raise ValueError(
                f"model.lora.targets={','.join(self.targets)!r}: unknown projection "
                f"{bad[0] if bad else '(none given)'!r}; choose among {','.join(TARGETS)}"
            )
        if self.rank < 1:
            raise ValueError(f"model.lora.rank={self.rank} must be >= 1 (0 turns LoRA off)")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"model.lora.dropout={self.dropout} must be in [0, 1)")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    @classmethod
    def from_config(cls, lora) -> "LoraSettings | None":
        """The ``model.lora`` config section; None when ``rank`` is 0 (LoRA off)."""
        if lora is None or int(lora.rank) == 0:
            return None
        targets = lora.targets
        if isinstance(targets, str):
            targets = [t.strip() for t in targets.split(",") if t.strip()]
        return cls(int(lora.rank), float(lora.alpha), tuple(targets), float(lora.dropout))


@dataclasses.dataclass(frozen=True)
class Adapted:
    """What `attach` did (static, hashable): settings, and each adapted projection's path in
    the model and the shape of its leading stack axes (``(num_layers,)`` in the layers)."""

    settings: LoraSettings
    paths: tuple[tuple[str, ...], ...]
    stacks: tuple[tuple[int, ...], ...]


class LoraDropout(nnx.Variable):
    """Per-forward dropout state of an adapter (a PRNG key's data, the keep probability)."""


class LoraDense(Dense):
    """A `Dense` projection plus ``(α/r)·(drop(x)·A)·B`` (set up by `attach`, not built)."""

    def __call__(self, x: jax.Array) -> jax.Array:
        y = super().__call__(x)
        return y + self.lora_delta(x, y.dtype)

    def lora_delta(self, x: jax.Array, dtype) -> jax.Array:
        """``(α/r)·(drop(x)·A)·B`` computed in ``dtype`` (the base output's); ``x [..., *in]``."""
        x = x.astype(dtype)
        if self.lora_dropout:
            x = _dropout(x, self.lora_key[...], self.lora_keep[...])
        a, b = self.lora_a[...].astype(dtype), self.lora_b[...].astype(dtype)
        n = self.lora_n_in
        h = jax.lax.dot_general(
            x, a, ((tuple(range(x.ndim - n, x.ndim)), tuple(range(n))), ((), ()))
        )
        d = jax.lax.dot_general(h, b, (((h.ndim - 1,), (0,)), ((), ())))
        return d * jnp.asarray(self.lora_scale, d.dtype)


def _dropout(x, key_data, keep):
    """Inverted dropout with keep probability ``keep``; ``keep == 1`` returns ``x`` exactly."""
    keep = keep.astype(x.dtype)
    mask = jax.random.bernoulli(jax.random.wrap_key_data(key_data), keep, x.shape)
    return jnp.where(mask, x / keep, jnp.zeros((), x.dtype))


def _stack_axes(var: nnx.Variable) -> int:
    """Leading stacked axes of a parameter: its leading ``layers`` logical names."""
    names = var.get_metadata().get("out_sharding") or ()
    n = 0
    while n < len(names) and names[n] == "layers":
        n += 1
    return n


def _targets(model: nnx.Module, targets) -> list[tuple[tuple, Dense]]:
    """The model's `Dense` projections whose attribute name is in ``targets``, by path."""
    found = [
        (tuple(str(p) for p in path), m)
        for path, m in nnx.iter_modules(model)
        if path and str(path[-1]) in targets and type(m) is Dense
    ]
    missing = sorted(set(targets) - {p[-1] for p, _ in found})
    if missing:
        have = sorted({str(p[-1]) for p, m in nnx.iter_modules(model) if type(m) is Dense})
        raise ValueError(
            f"model.lora.targets: this model has no {missing[0]!r} projection (its projections: "
            f"{', '.join(have)}); remove it from the targets"
        )
    return sorted(found)


def attach(model: nnx.Module, settings: LoraSettings, key: jax.Array) -> Adapted:
    """Add rank-``settings.rank`` adapters to ``model``'s target projections, in place.

    ``key`` draws every A (B is zero); works on abstract models (`nnx.eval_shape`) too.
    """
    if is_adapted(model):
        raise ValueError("the model already has LoRA adapters")
    paths, stacks = [], []
    for i, (path, dense) in enumerate(_targets(model, settings.targets)):
        kernel = dense.kernel
        s, n_in = _stack_axes(kernel), dense.n_in
        shape, names = kernel.shape, tuple(kernel.get_metadata()["out_sharding"])
        stack, d_in, d_out = shape[:s], shape[s : s + n_in], shape[s + n_in :]
        bound = 1.0 / math.sqrt(math.prod(d_in))
        a_shape = (*stack, *d_in, settings.rank)
        dtype = jnp.promote_types(kernel.dtype, jnp.float32)  # trained: never below float32
        a = jax.random.uniform(jax.random.fold_in(key, i), a_shape, dtype, -bound, bound)
        b = jnp.zeros((*stack, settings.rank, *d_out), dtype)
        a_names = (*names[: s + n_in], None)
        b_names = (*names[:s], None, *names[s + n_in :])
        object.__setattr__(dense, "__class__", LoraDense)  # not an attribute of the module
        dense.lora_a = nnx.LoRAParam(a, out_sharding=a_names, eager_sharding=False)
        dense.lora_b = nnx.LoRAParam(b, out_sharding=b_names, eager_sharding=False)
        dense.lora_scale = float(settings.scale)
        dense.lora_n_in = int(n_in)
        dense.lora_dropout = float(settings.dropout)
        if settings.dropout:
            k, keep = _dropout_values(stack, None, 1.0)
            dense.lora_key = LoraDropout(k, out_sharding=names[:s] + (None,), eager_sharding=False)
            dense.lora_keep = LoraDropout(keep, out_sharding=names[:s], eager_sharding=False)
        paths.append(path)
        stacks.append(tuple(stack))
    return Adapted(settings, tuple(paths), tuple(stacks))


def is_adapted(model: nnx.Module) -> bool:
    return any(isinstance(m, LoraDense) for _, m in nnx.iter_modules(model))


# ---- pure dicts: base, adapters, the adapted model's -------------------------------------


def _walk(tree: dict, path: tuple) -> dict:
    for key in path:
        tree = tree[key]
    return tree


def split_params(params: dict) -> tuple[dict, dict]:
    """An adapted model's pure dict → (base: exactly the un-adapted model's, adapters)."""
    base, adapters = {}, {}
    for key, value in params.items():
        if isinstance(value, dict):
            b, a = split_params(value)
            if b:
                base[key] = b
            if a:
                adapters[key] = a
        elif key in ADAPTER_KEYS:
            adapters[key] = value
        elif key not in _DROPOUT_KEYS:
            base[key] = value
    return base, adapters


def union(base: dict, adapters: dict) -> dict:
    """The nested union of two pure dicts with disjoint leaves (shares every array)."""
    out = dict(base)
    for key, value in adapters.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = union(out[key], value)
        elif key in out:
            raise ValueError(f"parameter {key!r} is both in the base and in the adapters")
        else:
            out[key] = value
    return out


def _dropout_values(stack, key, keep: float):
    """Key data ``[*stack, 2]`` (fresh keys from ``key``, zeros if None) and keep ``[*stack]``."""
    if key is None:
        data = jax.random.key_data(jax.random.key(0))
        data = jnp.zeros((*stack, *data.shape), data.dtype)
    else:
        data = jax.random.key_data(jax.random.split(key, stack))
    return data, jnp.full(stack, keep, jnp.float32)


def combine(base: dict, adapters: dict, adapted: Adapted, key: jax.Array | None = None) -> dict:
    """The adapted model's pure dict. ``key``: dropout for this forward (None: no dropout)."""
    params = union(base, adapters)
    rate = adapted.settings.dropout
    if not rate:
        return params
    extra: dict = {}
    for i, (path, stack) in enumerate(zip(adapted.paths, adapted.stacks, strict=True)):
        k = None if key is None else jax.random.fold_in(key, i)
        data, keep = _dropout_values(stack, k, 1.0 if key is None else 1.0 - rate)
        node = extra
        for p in path:
            node = node.setdefault(p, {})
        node.update(lora_key=data, lora_keep=keep)
    return union(params, extra)


def count(adapters: dict) -> int:
    """Number of adapter parameters."""
    return sum(math.prod(x.shape) for x in jax.tree.leaves(adapters))


# ---- merging: the adapted model as a plain one ------------------------------------------


def merged_kernel(kernel: jax.Array, a: jax.Array, b: jax.Array, n_in: int, scale: float):
    """``W + scale·A·B`` for a kernel ``[*stack, *in, *out]`` (float32 or wider, exact matmul)."""
    r = a.shape[-1]
    stack = a.shape[: a.ndim - n_in - 1]
    a2 = a.reshape(*stack, -1, r)
    b2 = b.reshape(*stack, r, -1)
    acc = jnp.promote_types(kernel.dtype, jnp.float32)
    d = jnp.matmul(a2.astype(acc), b2.astype(acc), precision=jax.lax.Precision.HIGHEST)
    return (kernel.astype(acc) + scale * d.reshape(kernel.shape)).astype(kernel.dtype)


def merged(model: nnx.Module) -> nnx.Module:
    """A copy of ``model`` with every adapter folded into its kernel: the plain model (same
    class and parameter paths as the base) whose outputs equal the adapted model's."""
    model = nnx.clone(model)
    for _, m in nnx.iter_modules(model):
        if not isinstance(m, LoraDense):
            continue
        w = merged_kernel(m.kernel[...], m.lora_a[...], m.lora_b[...], m.lora_n_in, m.lora_scale)
        m.kernel[...] = w
        for name in ADAPTER_KEYS + _DROPOUT_KEYS + ("lora_scale", "lora_n_in", "lora_dropout"):
            if hasattr(m, name):
                delattr(m, name)
        object.__setattr__(m, "__class__", Dense)
    return model


def adapter_modules(model: nnx.Module) -> list[tuple[tuple[str, ...], LoraDense]]:
    """``(path, module)`` of every adapted projection, in path order."""
    found = [
        (tuple(str(p) for p in path), m)
        for path, m in nnx.iter_modules(model)
        if isinstance(m, LoraDense)
    ]
    return sorted(found)
