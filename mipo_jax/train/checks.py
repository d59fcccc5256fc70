"""Config validation that runs before anything heavy (no data, no model, no compile).

Each error names the key, its value and what is allowed. The loss section is checked by
`mipo_jax.losses.validate` (or the KTO section for ``objective='unpaired'``).
"""

import math

from mipo_jax.data import LAYOUTS
from mipo_jax.data.pipeline import eval_plan
from mipo_jax.losses import check_reference_mode, requirements
from mipo_jax.losses import validate as validate_loss
from mipo_jax.models.config import DTYPES, FAMILIES, REMAT_POLICIES
from mipo_jax.train import adapters
from mipo_jax.train.optim import OPTIMIZERS, SCHEDULES

REFERENCE_MODES = ("live", "cached", "dataset")
OBJECTIVES = ("paired", "unpaired", "sft")
TOKEN_WEIGHT_TRANSFORMS = ("binary", "rank_based", "threshold_and_scale")
TOKEN_WEIGHT_SOURCES = ("dpo", "sft", "folders")


def _choice(key: str, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"{key}={value!r} is not allowed; choose one of: {', '.join(allowed)}")


def _check(cond: bool, key: str, value, rule: str) -> None:
    if not cond:
        raise ValueError(f"{key}={value!r} is out of range: {rule}")


def validate(config) -> None:
    """Raise ``ValueError`` naming the first bad key. Does not touch JAX's backend."""
    _choice("objective", config.objective, OBJECTIVES)
    if config.objective == "paired":
        validate_loss(config.loss)
    elif config.objective == "unpaired":
        _choice("kto.loss_type", config.kto.loss_type, ("kto", "apo_zero_unpaired"))
    _choice("optim.name", config.optim.name, OPTIMIZERS)
    _choice("optim.schedule", config.optim.schedule, SCHEDULES)
    lr = config.optim.learning_rate
    _check(lr > 0 and math.isfinite(lr), "optim.learning_rate", lr, "finite and > 0")
    _check(config.optim.warmup_steps >= 0, "optim.warmup_steps", config.optim.warmup_steps, ">= 0")
    ratio = config.optim.get("warmup_ratio", 0.0)
    _check(0 <= ratio < 1, "optim.warmup_ratio", ratio, "in [0, 1)")
    m = config.model
    init = m.init
    ok = init in ("random", "smollm2") or init.startswith(("hf:", "gguf:"))
    _check(ok, "model.init", init, "random | hf:<folder or org/name> | gguf:<file> | smollm2")
    _choice("model.family", m.family, FAMILIES)
    _choice("model.compute_dtype", m.compute_dtype, DTYPES)
    _choice("model.param_dtype", m.param_dtype, DTYPES)
    _choice("model.remat", m.remat, REMAT_POLICIES)
    if init == "random":
        _check_model_sizes(m)
    _choice("data.layout", config.data.layout, LAYOUTS)
    _choice("reference.mode", config.reference.mode, REFERENCE_MODES)
    t = config.train
    _check(config.batch_size >= 1, "batch_size", config.batch_size, ">= 1")
    _check(t.grad_accum >= 1, "train.grad_accum", t.grad_accum, ">= 1")
    _check(t.num_steps >= 1, "train.num_steps", t.num_steps, ">= 1")
    epochs = t.get("num_epochs", 0)
    _check(epochs >= 0, "train.num_epochs", epochs, ">= 0 (0: train.num_steps decides)")
    if epochs and "rounds" in config:
        raise ValueError("train.num_epochs: DICE/SPIN runs are rounds × steps_per_round steps")
    _check(t.max_nonfinite >= 1, "train.max_nonfinite", t.max_nonfinite, ">= 1")
    _check(t.logps_chunk >= 1, "train.logps_chunk", t.logps_chunk, ">= 1")
    groups = config.batch_size if config.data.layout == "padded" else config.data.groups
    _check(
        groups % t.grad_accum == 0,
        "train.grad_accum",
        t.grad_accum,
        f"must divide the groups per step ({groups}: batch_size, or data.groups when packed)",
    )
    _check(config.checkpoint.every >= 1, "checkpoint.every", config.checkpoint.every, ">= 1")
    _check(config.checkpoint.keep >= 1, "checkpoint.keep", config.checkpoint.keep, ">= 1")
    if t.eval_batches > 0:
        eval_plan(config.data, "eval")  # where evaluation rows come from (nothing is loaded)
    if config.sft.steps:
        lr = config.sft.learning_rate
        _check(lr > 0 and math.isfinite(lr), "sft.learning_rate", lr, "finite and > 0")
    _check_algorithm_state(config)
    adapters.validate(config)  # model.lora
    if "token_weights" in config:
        _check_token_weights(config.token_weights)


MODEL_SIZES = ("hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
               "head_dim", "max_position_embeddings")  # fmt: skip


def _check_model_sizes(m) -> None:
    """A random model's sizes (an HF folder's are checked by `ModelConfig` when read)."""
    for key in MODEL_SIZES:
        _check(m[key] >= 1, f"model.{key}", m[key], ">= 1")
    _check(m.vocab_size >= 0, "model.vocab_size", m.vocab_size, ">= 0 (0: the tokenizer's size)")
    _check(
        m.num_heads % m.num_kv_heads == 0,
        "model.num_kv_heads",
        m.num_kv_heads,
        f"must divide model.num_heads={m.num_heads}",
    )


def _check_token_weights(tw) -> None:
    """The ``token_weights`` section of TIS-DPO."""
    _choice("token_weights.transform", tw.transform, TOKEN_WEIGHT_TRANSFORMS)
    _choice("token_weights.source", tw.source, TOKEN_WEIGHT_SOURCES)
    if tw.transform == "binary":
        return
    if tw.source == "folders" and not (tw.positive and tw.negative):
        raise ValueError(
            "token_weights.source='folders' needs token_weights.positive and .negative (HF "
            "folders of π⁺ and π⁻); without them every weight would be 1 (plain DPO). Use "
            "source='dpo' or 'sft' to train them here, or transform='binary' for DPO's weights"
        )
    for key in ("steps", "learning_rate", "beta"):
        if tw[key] < 0:
            raise ValueError(f"token_weights.{key}={tw[key]!r} must be >= 0 (0: the default)")


def _check_algorithm_state(config) -> None:
    mode = config.reference.mode
    modules = ()
    if config.objective == "paired":  # what the loss's parts declare (mipo_jax.losses.needs)
        check_reference_mode(config.loss, mode)
        modules = requirements(config.loss).modules
    if ("ref_sync" in config or "rounds" in config) and mode != "live":
        raise ValueError(
            f"reference.mode={mode!r}: {config.algorithm}'s reference moves during the run "
            "(TR-DPO's sync, DICE/SPIN's previous policy), so no cache holds it; use "
            "reference.mode='live'"
        )
    if config.objective == "unpaired" and config.kto.loss_type == "kto" and mode != "live":
        raise ValueError(
            f"reference.mode={mode!r}: KTO's reference point z_0 scores each prompt with "
            "another example's completion, pairs that change with every batch and that no "
            "cache or dataset column holds; use reference.mode='live'"
        )
    if "prior" in modules and config.loss.prior.name != "learned":
        raise ValueError(
            f"loss.mi_weight={config.loss.mi_weight}: the mutual-information term trains a "
            "learnable prior; it needs loss.prior.name='learned' (configs/mipo_learned.py)"
        )
    for module, section in (("mask_net", "mask_net"), ("prior", "prior_model")):
        if module in modules and section not in config:
            raise ValueError(
                f"prior {config.loss.prior.name!r} trains a {module} next to the policy and "
                f"needs a '{section}' section: start from configs/"
                f"{'sparsepo' if module == 'mask_net' else 'mipo_learned'}.py"
            )
    if "prior_model" in config and config.data.layout != "padded" and config.loss.mi_weight:
        raise ValueError("the learnable prior's policy samples need data.layout='padded'")
    if "rounds" in config and config.rounds.num_rounds < 1:
        raise ValueError(f"rounds.num_rounds={config.rounds.num_rounds} must be >= 1")
    if "ref_sync" in config:
        a = config.ref_sync.mixup_alpha
        _check(0 < a <= 1, "ref_sync.mixup_alpha", a, "in (0, 1]")
        _check(
            config.ref_sync.sync_steps >= 1,
            "ref_sync.sync_steps",
            config.ref_sync.sync_steps,
            ">= 1",
        )


def validate_runtime(config, process_count: int) -> None:
    """Checks that need the (initialised) runtime: before data, models or compilation."""
    if "rounds" in config and config.batch_size % process_count:
        raise ValueError(
            f"batch_size={config.batch_size}: DICE/SPIN's round pairs are padded batches whose "
            f"examples split evenly over the processes; use a multiple of {process_count}"
        )
    import jax

    check_batch_split(config, jax.device_count(), process_count)


def mesh_sizes(config, device_count: int) -> tuple[int, int, int]:
    """The mesh's (data, fsdp, tensor) sizes as `mipo_jax.train.setup.mesh_of` builds it."""
    from mipo_jax.sharding.mesh import fill_sizes

    sizes = (config.mesh.data, config.mesh.fsdp, config.mesh.tensor)
    n = math.prod(sizes)
    try:
        return fill_sizes(sizes, device_count if -1 in sizes or n >= device_count else n)
    except ValueError as e:
        raise ValueError(
            f"mesh.data={sizes[0]}, mesh.fsdp={sizes[1]}, mesh.tensor={sizes[2]} on "
            f"{device_count} devices: {e}"
        ) from None


def check_batch_split(config, device_count: int, process_count: int) -> None:
    """Every batch the run shards over the data-parallel devices (data x fsdp) must split
    evenly: the train and eval batches, and the reference cache's and the exact task
    evaluation's scoring batches when those run."""
    data, fsdp, _ = mesh_sizes(config, device_count)
    dp = data * fsdp
    where = f"the {dp} data-parallel devices (mesh.data={data} x mesh.fsdp={fsdp})"
    fix = f"use a multiple of {dp}, or mesh sizes whose data x fsdp divides it"
    if config.data.layout == "padded":
        key, groups = "batch_size", config.batch_size
    else:  # packed layouts: data.groups per process and step
        key, groups = "data.groups", config.data.groups * process_count
    if groups % dp:
        value = config.batch_size if key == "batch_size" else config.data.groups
        raise ValueError(
            f"{key}={value}: the {groups} groups of a step do not split over {where}; {fix}"
        )
    if config.reference.mode == "cached" and config.reference.batch_size % dp:
        raise ValueError(
            f"reference.batch_size={config.reference.batch_size} (the reference cache's "
            f"scoring batch) does not split over {where}; {fix}"
        )
    import inspect

    from mipo_jax.train import task_eval

    if config.train.task_eval_prompts and config.data.source in task_eval.SOURCES:
        rows = inspect.signature(task_eval.TaskEval).parameters["batch_size"].default
        if rows % dp:
            raise ValueError(
                f"the exact task evaluation scores {rows} rows at a time, which do not split "
                f"over {where}; set train.task_eval_prompts=0 or mesh sizes whose data x "
                f"fsdp divides {rows}"
            )
