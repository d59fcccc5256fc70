"""`save_pretrained`: a `CausalLM` back to an HF folder that transformers' `from_pretrained` loads.

Writes ``config.json`` (`ModelConfig.to_hf`), safetensors files (one, or shards plus
``model.safetensors.index.json`` when larger than `max_shard_size`) in the HF layout given by
the same tables the loader uses, and the tokenizer if one is given. Tensors are gathered to
the host one at a time (a stacked parameter one layer at a time); in a multi-process run
every process takes part in the gathers and process 0 writes.

A model with LoRA adapters (`mipo_jax.models.lora`) is written merged, each adapted kernel
as ``W + (α/r)·A·B``, so the folder is a plain model of the base's architecture; with
``adapters=True`` the adapters are also written alone in PEFT's format (`save_peft_adapters`)
under ``<folder>/adapter``.

``folder`` is a local path or an object-store URL (`mipo_jax.paths`): files are written
through `etils.epath`, the tokenizer through a temporary local folder when remote.
"""

import json
import logging
import math
import struct

import jax
import ml_dtypes
import numpy as np
from jax.experimental import multihost_utils

from mipo_jax import paths
from mipo_jax.hf.load import expected_tensors, param_table, plan
from mipo_jax.hf.mappings import TABLES
from mipo_jax.hf.safetensors import INDEX, SINGLE
from mipo_jax.models import lora
from mipo_jax.models.transformer import CausalLM

log = logging.getLogger("mipo_jax.hf")
PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"

_CODES = {
    np.dtype(np.float32): "F32",
    np.dtype(np.float16): "F16",
    np.dtype(ml_dtypes.bfloat16): "BF16",
}


def write_safetensors(path, tensors: dict[str, np.ndarray]) -> None:
    """The safetensors format: u64 header length, JSON header, raw little-endian data."""
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, x in tensors.items():
        header[name] = {
            "dtype": _CODES[x.dtype],
            "shape": list(x.shape),
            "data_offsets": [offset, offset + x.nbytes],
        }
        offset += x.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with paths.open_write(path) as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for x in tensors.values():
            f.write(np.ascontiguousarray(x).tobytes())


def _host(x: jax.Array) -> np.ndarray:
    if jax.process_count() > 1:
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))


def save_pretrained(
    model: CausalLM,
    folder,
    *,
    tokenizer=None,
    dtype: str = "float32",
    max_shard_size: int = 4 * 2**30,
    adapters: bool = True,
) -> None:
    """Write `model` as an HF checkpoint folder (config.json + safetensors [+ tokenizer]).

    Args:
      tokenizer: anything with ``save_pretrained(folder)`` (an HF tokenizer), or None.
      dtype: 'float32', 'bfloat16' or 'float16' for the written tensors.
      max_shard_size: bytes per safetensors file before splitting into shards.
      adapters: a LoRA model's adapters also go to ``<folder>/adapter`` in PEFT's format
        (families with one HF module per projection; GPT-2's fused ``c_attn`` has none).
    """
    folder = paths.path(folder)
    if lora.is_adapted(model):
        if adapters and peft_modules(model) is not None:
            save_peft_adapters(model, folder / "adapter", dtype=dtype)
        elif adapters:
            log.info("%s: no PEFT module names for LoRA on this family; merged only", folder)
        model = lora.merged(model)
    cfg, params = model.config, param_table(model)
    expected = expected_tensors(cfg, plan(cfg, params), params)
    np_dtype = np.dtype(ml_dtypes.bfloat16 if dtype == "bfloat16" else dtype)
    shards = _split(expected, np_dtype.itemsize, max_shard_size)
    writer = jax.process_index() == 0
    if writer:
        folder.mkdir(parents=True, exist_ok=True)
    weight_map = {}
    for k, names in enumerate(shards):
        file = SINGLE if len(shards) == 1 else f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {}
        for name in names:
            rule, layer, _ = expected[name]
            arrays = [params[p][...] for p in rule.paths]
            arrays = [_host(a[layer] if rule.stacked else a) for a in arrays]
            tensors[name] = np.ascontiguousarray(rule.to_hf(arrays).astype(np_dtype))
            weight_map[name] = file
        if writer:
            write_safetensors(folder / file, tensors)
    if not writer:
        return
    if len(shards) > 1:
        total = sum(math.prod(s) for _, _, s in expected.values()) * np_dtype.itemsize
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (folder / INDEX).write_text(json.dumps(index, indent=2))
    hf_config = {**cfg.to_hf(), "dtype": dtype}
    (folder / "config.json").write_text(json.dumps(hf_config, indent=2, sort_keys=True))
    if tokenizer is not None:
        paths.save_into(folder, tokenizer.save_pretrained)


def _split(expected: dict, itemsize: int, max_bytes: int) -> list[list[str]]:
    shards, size = [[]], 0
    for name, (_, _, shape) in expected.items():
        nbytes = math.prod(shape) * itemsize
        if shards[-1] and size + nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


# ---- LoRA adapters alone, in PEFT's format ------------------------------------------------


def peft_modules(model: CausalLM) -> dict[tuple[str, ...], str] | None:
    """Each adapted projection's HF module name pattern (``model.layers.{i}.self_attn.q_proj``),
    or None when one has no HF module of its own (a fused tensor, e.g. GPT-2's ``c_attn``)."""
    rules = {
        r.paths[0]: r
        for r in TABLES[model.config.family]
        if len(r.paths) == 1 and r.kind == "linear" and r.stacked
    }
    out = {}
    for path, _ in lora.adapter_modules(model):
        rule = rules.get(".".join(path) + ".kernel")
        if rule is None:
            return None
        out[path] = rule.hf.removesuffix(".weight")
    return out


def save_peft_adapters(
    model: CausalLM, folder, *, base_model: str | None = None, dtype="float32"
) -> None:
    """Write a LoRA model's adapters as PEFT does: ``adapter_config.json`` and
    ``adapter_model.safetensors`` with ``base_model.model.<module>.lora_A.weight [r, in]`` and
    ``lora_B.weight [out, r]`` per layer (``peft.PeftModel.from_pretrained`` on the base HF
    model loads it). ``base_model``: recorded as ``base_model_name_or_path``."""
    names = peft_modules(model)
    if names is None:
        raise ValueError(f"{model.config.family}: no PEFT module names for its LoRA projections")
    np_dtype = np.dtype(ml_dtypes.bfloat16 if dtype == "bfloat16" else dtype)
    tensors, settings = {}, set()
    for path, m in lora.adapter_modules(model):
        a, b = _host(m.lora_a[...]), _host(m.lora_b[...])
        r = a.shape[-1]
        settings.add((r, m.lora_scale * r, m.lora_dropout))
        for i in range(model.config.num_layers):
            module = "base_model.model." + names[path].format(i=i)
            tensors[module + ".lora_A.weight"] = a[i].reshape(-1, r).T.astype(np_dtype)
            tensors[module + ".lora_B.weight"] = b[i].reshape(r, -1).T.astype(np_dtype)
    if len(settings) != 1:
        raise ValueError(f"PEFT's format has one rank and alpha per adapter; got {settings}")
    ((rank, alpha, dropout),) = settings
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": int(rank),
        "lora_alpha": float(alpha),
        "lora_dropout": float(dropout),
        "target_modules": sorted({n.rsplit(".", 1)[-1] for n in names.values()}),
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
    }
    if jax.process_index() != 0:
        return
    folder = paths.path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    write_safetensors(folder / PEFT_WEIGHTS, dict(sorted(tensors.items())))
    (folder / PEFT_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True))
