"""A tiny name → function registry with declared hyper-parameters (big_vision style)."""

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Entry:
    fn: Callable
    params: dict[str, Any] = field(default_factory=dict)  # name -> default value
    doc: str = ""


class Registry:
    """Functions registered by name; each entry declares the config keys it reads."""

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, Entry] = {}

    def register(self, name: str, **params: Any) -> Callable:
        def wrap(fn: Callable) -> Callable:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} registered twice")
            doc = (fn.__doc__ or "").strip().splitlines()
            self._entries[name] = Entry(fn, dict(params), doc[0] if doc else "")
            return fn

        return wrap

    def names(self) -> list[str]:
        return sorted(self._entries)

    def get(self, name: str) -> Entry:
        if name not in self._entries:
            raise ValueError(
                f"unknown {self.kind} {name!r}; choose one of: {', '.join(self.names())}"
            )
        return self._entries[name]

    def __contains__(self, name: str) -> bool:
        return name in self._entries
