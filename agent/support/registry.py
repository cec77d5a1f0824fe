"""A registry that finds its entries: every module of one package that defines a given attribute.

The runtime backends (``agent.runtimes.registry``) and the task decoders (``agent.vision.registry``)
are each one of these, so adding a backend or a task is adding a file; ``register`` adds one from
outside the package (a plugin, a test).
"""

from __future__ import annotations

import importlib
import pkgutil
import threading
from collections.abc import Callable
from typing import Generic, Protocol, TypeVar


class Named(Protocol):
    name: str


T = TypeVar("T", bound=Named)


class Registry(Generic[T]):
    """Entries by name: those found in ``package`` (each module's ``attr``, modules in name order), then
    the registered ones. Discovery happens on first use, not at import."""

    def __init__(self, package: str, attr: str, kind: str, order: Callable[[T], object] | None = None):
        self.package, self.attr, self.kind, self.order = package, attr, kind, order
        self._lock = threading.Lock()
        self._entries: dict[str, T] = {}
        self._found = False

    def _discover(self) -> None:
        with self._lock:
            if self._found:
                return
            package = importlib.import_module(self.package)
            for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda i: i.name):
                entry = getattr(importlib.import_module(f"{self.package}.{info.name}"), self.attr, None)
                if entry is not None:
                    self._entries.setdefault(entry.name, entry)
            self._found = True

    def register(self, entry: T) -> None:
        """Add an entry from outside the package; a name that is taken is an error."""
        self._discover()
        with self._lock:
            if entry.name in self._entries:
                raise ValueError(f"a {self.kind} named {entry.name!r} is already registered")
            self._entries[entry.name] = entry

    def unregister(self, name: str) -> None:
        """Remove an entry added with ``register`` (tests clean up with it)."""
        with self._lock:
            self._entries.pop(name, None)

    def all(self) -> list[T]:
        self._discover()
        entries = list(self._entries.values())
        return sorted(entries, key=self.order) if self.order else entries

    def names(self) -> tuple[str, ...]:
        return tuple(e.name for e in self.all())

    def get(self, name: str) -> T | None:
        self._discover()
        return self._entries.get(name)
