"""Experiment configs: one ``get_config(arg)`` file per algorithm (ml_collections)."""

import pathlib

_HERE = pathlib.Path(__file__).resolve().parent


def names() -> list[str]:
    """Every config name (``configs/<name>.py`` with a ``get_config``)."""
    return sorted(p.stem for p in _HERE.glob("*.py") if p.stem not in ("__init__", "common"))
