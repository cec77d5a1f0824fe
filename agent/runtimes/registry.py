"""The runtime backends, found rather than listed: every module in agent/runtimes/ that defines ``BACKEND``.

Adding a backend is adding that one file (see docs/architecture.md); ``register`` adds one from
outside the package (a plugin, a test). Formats are what the backends declare, so model files,
model.yaml, manifests and the model store know exactly the formats something here can run.
"""

from __future__ import annotations

import importlib
import pkgutil
import threading
from pathlib import Path

from agent.runtimes.base import Backend, ModelFormat

_lock = threading.Lock()
_backends: dict[str, Backend] = {}
_found = False


def _discover() -> None:
    global _found
    with _lock:
        if _found:
            return
        package = importlib.import_module("agent.runtimes")
        for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda i: i.name):
            module = importlib.import_module(f"agent.runtimes.{info.name}")
            backend = getattr(module, "BACKEND", None)
            if backend is not None:
                _backends.setdefault(backend.name, backend)
        _found = True


def register(backend: Backend) -> None:
    """Add a backend from outside agent/runtimes/ (after the built-in ones; a taken name is an error)."""
    _discover()
    with _lock:
        if backend.name in _backends:
            raise ValueError(f"a runtime backend named {backend.name!r} is already registered")
        _backends[backend.name] = backend


def unregister(name: str) -> None:
    """Remove a backend added with ``register`` (tests clean up with it)."""
    with _lock:
        _backends.pop(name, None)


def backends() -> list[Backend]:
    """Every backend, by rank (then name)."""
    _discover()
    return sorted(_backends.values(), key=lambda b: (b.rank, b.name))


def backend(name: str) -> Backend:
    """The backend called ``name``; KeyError names the ones there are."""
    _discover()
    try:
        return _backends[name]
    except KeyError:
        raise KeyError(f"no runtime backend {name!r}; there are {', '.join(_backends)}") from None


def backend_names() -> tuple[str, ...]:
    return tuple(b.name for b in backends())


def formats() -> list[ModelFormat]:
    """Every model format some backend runs, once each."""
    seen: dict[str, ModelFormat] = {}
    for b in backends():
        for f in b.formats:
            seen.setdefault(f.name, f)
    return list(seen.values())


def format_names() -> tuple[str, ...]:
    return tuple(f.name for f in formats())


def backends_for(model_format: str) -> list[Backend]:
    """The backends that run ``model_format``, in preference order (the first is auto's pick)."""
    return [b for b in backends() if any(f.name == model_format for f in b.formats)]


def detect_format(path: str | Path) -> str:
    """The model format from the file's first bytes (never from its name); ValueError when none matches."""
    with open(path, "rb") as f:
        head = f.read(16)
    for fmt in formats():
        if fmt.sniff(head):
            return fmt.name
    known = " or ".join(f"{f.title} ({f.suffix})" for f in formats())
    raise ValueError(f"{path}: not a {known} model (first bytes {head[:8].hex()})")
