"""`SafetensorsSource`: an HF folder (config.json plus one or sharded safetensors files).

Tensors are memory-mapped and read one at a time; the header gives every shape before
anything is read, so a loader can validate a whole checkpoint up front. The format is
parsed here directly (8-byte little-endian header length, a JSON header, raw data) so that
bfloat16 and float8 tensors load as NumPy arrays (via ml_dtypes) without torch.
"""

import json
import struct
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

_DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": ml_dtypes.bfloat16,
    "F8_E4M3": ml_dtypes.float8_e4m3fn,
    "F8_E5M2": ml_dtypes.float8_e5m2,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}
SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"


def read_header(path: Path) -> tuple[dict[str, Any], int]:
    """The JSON header of a safetensors file and the byte offset where its data starts."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return header, 8 + n


class SafetensorsSource:
    """`CheckpointSource` over a folder with ``config.json`` and ``model.safetensors`` or
    ``model.safetensors.index.json`` plus the shard files it names."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        config = self.folder / "config.json"
        if not config.is_file():
            raise FileNotFoundError(f"{config} not found: not a Hugging Face model folder")
        self._config = json.loads(config.read_text())
        self._where: dict[str, tuple[Path, dict[str, Any], int]] = {}
        for file in self._files():
            header, start = read_header(file)
            for name, info in header.items():
                self._where[name] = (file, info, start)

    def _files(self) -> list[Path]:
        index = self.folder / INDEX
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted({self.folder / f for f in weight_map.values()})
            missing = [f for f in files if not f.is_file()]
            if missing:
                raise FileNotFoundError(f"{missing[0]} is named in {index} but does not exist")
            return files
        single = self.folder / SINGLE
        if single.is_file():
            return [single]
        raise FileNotFoundError(f"neither {SINGLE} nor {INDEX} in {self.folder}")

    @property
    def config(self) -> dict[str, Any]:
        return dict(self._config)

    def keys(self) -> list[str]:
        return list(self._where)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._info(name)[1]["shape"])

    def get(self, name: str) -> np.ndarray:
        file, info, start = self._info(name)
        if info["dtype"] not in _DTYPES:
            raise ValueError(f"tensor {name!r} has unsupported dtype {info['dtype']}")
        dtype = np.dtype(_DTYPES[info["dtype"]])
        begin, end = info["data_offsets"]
        shape = tuple(info["shape"])
        if end - begin != dtype.itemsize * int(np.prod(shape)):
            raise ValueError(f"tensor {name!r} in {file}: data size does not match its shape")
        if end == begin:
            return np.zeros(shape, dtype)
        data = np.memmap(file, dtype=dtype, mode="r", offset=start + begin, shape=shape)
        return np.array(data)

    def _info(self, name: str):
        if name not in self._where:
            raise KeyError(f"tensor {name!r} not in {self.folder}")
        return self._where[name]
