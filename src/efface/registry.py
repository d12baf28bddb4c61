"""One generic registry; methods, attacks and metrics each have one instance of it."""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable
from typing import Generic, TypeVar

from efface.errors import InputError

T = TypeVar("T")
_NAME = re.compile(r"^[a-z0-9][a-z0-9-]*$")


class Registry(Generic[T]):
    """Maps lowercase, hyphenated names to classes; ``register`` is used as a class decorator."""

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        if not _NAME.match(name):
            raise ValueError(f"{self.kind} name {name!r} must be lowercase letters, digits and hyphens")

        def decorator(obj: T) -> T:
            if name in self._entries and self._entries[name] is not obj:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._entries[name] = obj
            return obj

        return decorator

    def get(self, name: str) -> T:
        if name not in self._entries:
            valid = ", ".join(self.names()) or "none yet"
            raise InputError(f"unknown {self.kind} {name!r}; valid {self.kind}s: {valid}")
        return self._entries[name]

    def names(self, pattern: str | None = None) -> list[str]:
        names = sorted(self._entries)
        return [n for n in names if fnmatch.fnmatch(n, pattern)] if pattern else names

    def items(self) -> list[tuple[str, T]]:
        return [(n, self._entries[n]) for n in self.names()]

    def supporting(self, family: str) -> list[str]:
        """The names whose class declares model family ``family`` (its ``families``)."""
        return [n for n, obj in self.items() if family in getattr(obj, "families", ())]

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __len__(self) -> int:
        return len(self._entries)


METHODS: Registry = Registry("method")
ATTACKS: Registry = Registry("attack")
METRICS: Registry = Registry("metric")
