"""`save_pretrained`: a `CausalLM` back to an HF folder that transformers' `from_pretrained` loads.

Writes ``config.json`` (`ModelConfig.to_hf`), safetensors files (one, or shards plus
``model.safetensors.index.json`` when larger than `max_shard_size`) in the HF layout given by
the same tables the loader uses, and the tokenizer if one is given. Tensors are gathered to
the host one at a time (a stacked parameter one layer at a time); in a multi-process run
every process takes part in the gathers and process 0 writes.
"""

import json
import math
import struct
from pathlib import Path

import jax
import ml_dtypes
import numpy as np
from jax.experimental import multihost_utils

from mipo_jax.hf.load import expected_tensors, param_table, plan
from mipo_jax.hf.safetensors import INDEX, SINGLE
from mipo_jax.models.transformer import CausalLM

_CODES = {
    np.dtype(np.float32): "F32",
    np.dtype(np.float16): "F16",
    np.dtype(ml_dtypes.bfloat16): "BF16",
}


def write_safetensors(path: Path, tensors: dict[str, np.ndarray]) -> None:
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
    with open(path, "wb") as f:
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
    folder: str | Path,
    *,
    tokenizer=None,
    dtype: str = "float32",
    max_shard_size: int = 4 * 2**30,
) -> None:
    """Write `model` as an HF checkpoint folder (config.json + safetensors [+ tokenizer]).

    Args:
      tokenizer: anything with ``save_pretrained(folder)`` (an HF tokenizer), or None.
      dtype: 'float32', 'bfloat16' or 'float16' for the written tensors.
      max_shard_size: bytes per safetensors file before splitting into shards.
    """
    folder = Path(folder)
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
        tokenizer.save_pretrained(str(folder))


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
