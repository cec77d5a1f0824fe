"""The runtime backends, found rather than listed: every module in agent/runtimes/ that defines ``BACKEND``.

Adding a backend is adding that one file (see docs/architecture.md); ``register`` adds one from
outside the package (a plugin, a test). Formats are what the backends declare, so model files,
model.yaml, manifests and the model store know exactly the formats something here can run.
"""

from __future__ import annotations

from pathlib import Path

from agent.runtimes.base import Backend, ModelFormat
from agent.support.registry import Registry

_backends: Registry[Backend] = Registry("agent.runtimes", "BACKEND", "runtime backend",
                                       order=lambda b: (b.rank, b.name))
register = _backends.register
unregister = _backends.unregister


def backends() -> list[Backend]:
    """Every backend, by rank (then name)."""
    return _backends.all()


def backend(name: str) -> Backend:
    """The backend called ``name``; KeyError names the ones there are."""
    found = _backends.get(name)
    if found is None:
        raise KeyError(f"no runtime backend {name!r}; there are {', '.join(backend_names())}")
    return found


def backend_names() -> tuple[str, ...]:
    return _backends.names()


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
