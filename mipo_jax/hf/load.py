"""`load_pretrained`: an HF checkpoint streamed tensor by tensor into a (sharded) `CausalLM`.

The model is built abstractly (`nnx.eval_shape`, no memory), the checkpoint is checked
against it as a whole (names, and shapes where the source can tell them without reading),
and only then is each HF tensor read, converted to our layout, and placed straight into its
target sharding with `jax.make_array_from_callback` (each device receives only its slice).
Stacked per-layer parameters are filled one layer at a time into a donated device buffer.
At no point does the host hold more than one HF tensor, nor any device more than its shards.

Any mismatch raises `CheckpointError` naming the tensor before a model is returned.
"""

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mipo_jax.hf.hub import resolve_model
from mipo_jax.hf.mappings import IGNORED, TABLES, Rule, normalise_name
from mipo_jax.hf.safetensors import SafetensorsSource
from mipo_jax.hf.source import CheckpointSource
from mipo_jax.models.config import ModelConfig, UnsupportedConfigError
from mipo_jax.models.transformer import CausalLM
from mipo_jax.sharding.rules import Rules, named_sharding


class CheckpointError(UnsupportedConfigError):
    """A checkpoint whose tensors do not fit the model its config describes."""


def abstract_model(cfg: ModelConfig) -> CausalLM:
    """The model with `jax.ShapeDtypeStruct` parameters (no memory, mesh-independent).

    `jax.eval_shape` rather than `nnx.eval_shape`: the latter reads logical names as mesh
    axes when a mesh is set.
    """
    graphdef = None

    def make():
        nonlocal graphdef
        graphdef, state = nnx.split(CausalLM(cfg, rngs=nnx.Rngs(0)))
        return state

    state = jax.eval_shape(make)
    return nnx.merge(graphdef, state)


def param_table(model: CausalLM) -> dict[str, nnx.Variable]:
    """Our parameters by dotted path (``layers.attn.q.kernel``)."""
    _, state = nnx.split(model)
    return {".".join(map(str, p)): v for p, v in nnx.to_flat_state(state)}


def plan(cfg: ModelConfig, params: dict[str, nnx.Variable]) -> list[Rule]:
    """The table's rules that apply to this model; every parameter is covered once."""
    rules, covered = [], {}
    for rule in TABLES[cfg.family]:
        present = [p in params for p in rule.paths]
        if all(present):
            rules.append(rule)
            covered.update(dict.fromkeys(rule.paths, rule.hf))
        elif any(present):
            raise RuntimeError(f"mapping rule {rule.hf} covers only part of {rule.paths}")
    uncovered = sorted(set(params) - set(covered))
    if uncovered:
        raise RuntimeError(f"no HF mapping rule for parameter {uncovered[0]!r} ({cfg.family})")
    return rules


def expected_tensors(cfg: ModelConfig, rules: list[Rule], params) -> dict[str, tuple]:
    """HF tensor name -> (rule, layer, HF shape) for every tensor the model needs."""
    out = {}
    for rule in rules:
        shapes = [params[p].shape[1:] if rule.stacked else params[p].shape for p in rule.paths]
        hf_shape = rule.hf_shape(shapes)
        for layer in range(cfg.num_layers) if rule.stacked else [None]:
            out[rule.hf_name(layer)] = (rule, layer, hf_shape)
    return out


def check_names(cfg: ModelConfig, expected: dict, names: dict[str, str]) -> None:
    """Raise on missing or unexpected tensors. `names`: normalised name -> source name."""
    missing = sorted(set(expected) - set(names))
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointError(f"missing tensor {missing[0]!r}{more} for this {cfg.family} config")
    ignored = IGNORED[cfg.family]
    tied_head = {"lm_head.weight"} if cfg.tie_embeddings else set()
    extra = sorted(
        n for n in set(names) - set(expected) if not ignored.match(n) and n not in tied_head
    )
    if extra:
        more = f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""
        raise CheckpointError(
            f"unexpected tensor {names[extra[0]]!r}{more}: not part of a {cfg.family} model "
            f"with this config (num_hidden_layers={cfg.num_layers}, biases, tied embeddings)"
        )


def _check_shape(name: str, got, want) -> None:
    if tuple(got) != tuple(want):
        raise CheckpointError(f"tensor {name!r} has shape {tuple(got)}, expected {tuple(want)}")


def _put(x: np.ndarray, sharding) -> jax.Array:
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])


@jax.jit(donate_argnums=0)
def _set_layer(buffer, layer, value):
    return jax.lax.dynamic_update_index_in_dim(buffer, value, layer, axis=0)


def load_pretrained(
    source: CheckpointSource | str | Path,
    *,
    mesh: jax.sharding.Mesh | None = None,
    rules: Rules | None = None,
    revision: str | None = None,
    **policy,
) -> CausalLM:
    """Load an HF checkpoint into a `CausalLM`, sharded over `mesh` by logical `rules`.

    Args:
      source: a `CheckpointSource`, a folder (see `SafetensorsSource`), or a hub model id
        (``org/name``, optionally ``hf:org/name``) resolved by `mipo_jax.hf.hub.resolve_model`
        (hub cache first; offline only the cache).
      mesh: target mesh; None puts everything on the default device.
      rules: logical-axis rules (default `mipo_jax.sharding.RULES`).
      revision: a hub id's branch, tag or commit (default ``main``).
      **policy: `ModelConfig` runtime fields (param_dtype, compute_dtype, remat, scan_layers,
        attention_block).
    """
    if not isinstance(source, CheckpointSource):
        source = SafetensorsSource(resolve_model(source, revision=revision))
    cfg = ModelConfig.from_hf(source.config, **policy)
    model = abstract_model(cfg)
    params = param_table(model)
    expected = expected_tensors(cfg, plan(cfg, params), params)
    names = {normalise_name(cfg.family, n): n for n in source.keys()}
    check_names(cfg, expected, names)
    if hasattr(source, "shape"):
        for name, (_, _, want) in expected.items():
            _check_shape(names[name], source.shape(names[name]), want)

    values = _stream(source, cfg, expected, names, params, mesh, rules)
    graphdef, state = nnx.split(model)
    flat = [(p, v.replace(values[".".join(map(str, p))])) for p, v in nnx.to_flat_state(state)]
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def _stream(source, cfg, expected, names, params, mesh, rules) -> dict[str, jax.Array]:
    """Read each HF tensor once and place its parts into their (sharded) parameters."""
    dtype = jnp.dtype(cfg.param_dtype)

    def sharding(logical, shape):
        if mesh is None:
            return jax.sharding.SingleDeviceSharding(jax.devices()[0])
        return named_sharding(logical, shape, mesh, rules)

    values: dict[str, jax.Array] = {}
    for name, (rule, layer, want) in expected.items():
        x = np.asarray(source.get(names[name]))
        _check_shape(names[name], x.shape, want)
        shapes = [params[p].shape[1:] if rule.stacked else params[p].shape for p in rule.paths]
        for path, part in zip(rule.paths, rule.to_ours(x, shapes), strict=True):
            logical, shape = params[path].get_metadata()["out_sharding"], params[path].shape
            part = part.astype(dtype)
            if not rule.stacked:
                values[path] = _put(part, sharding(logical, shape))
                continue
            if path not in values:
                values[path] = _zeros(shape, dtype, sharding(logical, shape))
            one = _put(part, sharding(logical[1:], part.shape))
            values[path] = _set_layer(values[path], layer, one)
        del x
    return values


def _zeros(shape, dtype, sharding) -> jax.Array:
    return jax.jit(jnp.zeros, static_argnums=(0, 1), out_shardings=sharding)(shape, dtype)
