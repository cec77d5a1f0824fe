"""The probe (hardware facts plus which runtimes work) and the choice of backend and accelerator.

``choose_runtime`` is a pure function of the facts, so every rule is tested on fixture trees; the
rules that belong to one runtime live in that backend's file, this one checks what holds for all.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from agent.hardware.facts import HardwareFacts, RuntimeAvailability, read_facts
from agent.runtimes import registry
from agent.runtimes.base import RuntimeChoice, RuntimeChoiceError
from agent.vocab import ACCELERATORS, AUTO


def detect_runtimes(first_only: bool = False) -> dict[str, RuntimeAvailability]:
    """Which runtime modules work here, every backend's (each check is cached per process).

    ``first_only`` stops each backend at its first module that works, so a daemon on a machine
    that also has full TensorFlow never pays for importing it.
    """
    found: dict[str, RuntimeAvailability] = {}
    for b in registry.backends():
        found.update(b.availability(first_only))
    return found


def probe(root: str | Path = "/", *, check_runtimes: bool | str = True, arch: str | None = None) -> HardwareFacts:
    """Hardware facts under ``root``; optionally which inference runtimes work.

    ``check_runtimes="first"`` checks each backend's modules only until one works (what the daemon needs).
    """
    facts = read_facts(root, arch=arch)
    if not check_runtimes:
        return facts
    return dataclasses.replace(facts, runtimes=detect_runtimes(first_only=check_runtimes == "first"))


def choose_runtime(facts: HardwareFacts, model_format: str, backend: str = AUTO, accelerator: str = AUTO,
                   compiled_for: str | None = None) -> RuntimeChoice:
    """Pick backend, module and accelerator for a model format; raise RuntimeChoiceError if impossible.

    ``compiled_for`` is the accelerator the model file was built for (``compiled_for_file``).
    """
    for what, value, allowed in (("model format", model_format, registry.format_names()),
                                 ("backend", backend, (AUTO, *registry.backend_names())),
                                 ("accelerator", accelerator, (AUTO, *ACCELERATORS))):
        if value not in allowed:
            raise RuntimeChoiceError(f"unknown {what} {value!r}; expected one of {', '.join(allowed)}")
    able = registry.backends_for(model_format)
    if backend != AUTO and registry.backend(backend) not in able:
        pinned = registry.backend(backend)
        into = " or ".join(f.suffix for f in pinned.formats)
        raise RuntimeChoiceError(f"{pinned.label} cannot run .{model_format} files; convert the model to {into} "
                                 "or set runtime.backend: auto")
    chosen = registry.backend(backend) if backend != AUTO else able[0]
    return chosen.choose(facts, accelerator, compiled_for)


def compiled_for_file(path: Path, model_format: str) -> str | None:
    """The accelerator ``path`` was compiled for, as the backends of its format read it (None: any)."""
    if not path.is_file():
        return None
    return next((c for b in registry.backends_for(model_format) if (c := b.compiled_for(path))), None)


def chooser(facts: HardwareFacts, path: Path, backend: str = AUTO, accelerator: str = AUTO):
    """``choose(format) -> RuntimeChoice`` for the model at ``path``, as load_model takes it."""
    return lambda model_format: choose_runtime(facts, model_format, backend, accelerator,
                                               compiled_for=compiled_for_file(path, model_format))
