"""A tiny name → function registry with declared hyper-parameters (big_vision style) and
declared inputs: each entry names the config keys it reads and the ``TokenInputs`` fields it
needs (words of :data:`mipo_jax.types.NEEDS`), so what a loss reads is known without tracing.
"""

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from mipo_jax.types import NEEDS


@dataclass(frozen=True)
class Entry:
    fn: Callable
    params: dict[str, Any] = field(default_factory=dict)  # name -> default value
    doc: str = ""
    needs: tuple[str, ...] = ()  # words of mipo_jax.types.NEEDS


class Registry:
    """Functions registered by name; each entry declares the config keys it reads (``params``)
    and the batch inputs it needs (``needs``)."""

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, Entry] = {}

    def register(self, name: str, needs: tuple[str, ...] = (), **params: Any) -> Callable:
        unknown = [w for w in needs if w not in NEEDS]
        if unknown:
            raise ValueError(
                f"{self.kind} {name!r} needs {unknown}, which are not words of "
                f"mipo_jax.types.NEEDS: {', '.join(NEEDS)}"
            )

        def wrap(fn: Callable) -> Callable:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} registered twice")
            doc = (fn.__doc__ or "").strip().splitlines()
            self._entries[name] = Entry(fn, dict(params), doc[0] if doc else "", tuple(needs))
            return fn

        return wrap

    def names(self) -> list[str]:
        return sorted(self._entries)

    def items(self) -> Iterator[tuple[str, Entry]]:
        """``(name, entry)`` in registration order."""
        return iter(self._entries.items())

    def get(self, name: str) -> Entry:
        if name not in self._entries:
            raise ValueError(
                f"unknown {self.kind} {name!r}; choose one of: {', '.join(self.names())}"
            )
        return self._entries[name]

    def __contains__(self, name: str) -> bool:
        return name in self._entries
