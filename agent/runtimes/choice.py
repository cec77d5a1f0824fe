"""The probe (hardware facts plus which runtimes work) and the choice of backend and accelerator.

``choose_runtime`` is a pure function of the facts, so every rule is tested on fixture trees; the
rules that belong to one runtime live in that backend's file, this one checks what holds for all.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

from agent.hardware.facts import HardwareFacts, RuntimeAvailability, read_facts
from agent.runtimes import registry
from agent.runtimes.base import RuntimeChoice, RuntimeChoiceError
from agent.runtimes.isolated import ChildCrashed, in_child
from agent.vocab import ACCELERATORS, AUTO

log = logging.getLogger(__name__)


CHECK_TIMEOUT_S = 60.0
_checked: dict[tuple[int, bool], dict[str, RuntimeAvailability]] = {}


def detect_runtimes(first_only: bool = False, *, isolate: bool = True) -> dict[str, RuntimeAvailability]:
    """Which runtime modules work here, every backend's (cached per process).

    ``first_only`` stops each backend at its first module that works, so a daemon on a machine
    that also has full TensorFlow never pays for importing it. ``isolate`` runs each backend's
    check in a forked child (``checked_in_child``); ``False`` is for a process that is a child already.
    """
    found: dict[str, RuntimeAvailability] = {}
    for b in registry.backends():
        if not isolate:
            found.update(b.availability(first_only))
            continue
        key = (id(b), first_only)
        if key not in _checked:
            _checked[key] = checked_in_child(b, first_only)
        found.update(_checked[key])
    return found


def checked_in_child(b, first_only: bool) -> dict[str, RuntimeAvailability]:
    """``b.availability`` in a child: a runtime that segfaults (XNNPACK on a CPU it misreads, a broken
    delegate) takes the child down, and the backend is checked again in its safe mode, if it has one."""
    try:
        return in_child(lambda: b.availability(first_only), timeout=CHECK_TIMEOUT_S, what=f"{b.label}'s check")
    except ChildCrashed as exc:
        crash = str(exc)
    log.error("probe: %s", crash)
    if getattr(b, "safe_choice", None) is not None:
        try:
            found = in_child(lambda: b.availability(first_only, safe=True), timeout=CHECK_TIMEOUT_S,
                             what=f"{b.label}'s check with {b.safe_mode}")
        except ChildCrashed as exc:
            crash += f"; {exc}"
        else:
            log.warning("probe: %s works with %s", b.label, b.safe_mode)
            return {n: dataclasses.replace(r, fallback=f"{crash}; it works with {b.safe_mode}") if r.available else r
                    for n, r in found.items()}
    return {n: RuntimeAvailability(n, False, error=crash) for n in getattr(b, "modules", (b.name,))}


def probe(root: str | Path = "/", *, check_runtimes: bool | str = True, arch: str | None = None,
          isolate: bool = True) -> HardwareFacts:
    """Hardware facts under ``root``; optionally which inference runtimes work.

    ``check_runtimes="first"`` checks each backend's modules only until one works (what the daemon needs).
    """
    facts = read_facts(root, arch=arch)
    if not check_runtimes:
        return facts
    return dataclasses.replace(facts, runtimes=detect_runtimes(first_only=check_runtimes == "first", isolate=isolate))


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
    choice = chosen.choose(facts, accelerator, compiled_for)
    checked = facts.runtimes.get(choice.module)
    if checked is not None and checked.fallback:  # it works here only in safe mode: the probe says why
        safe = chosen.safe_choice(choice)
        if safe is None:
            raise RuntimeChoiceError(f"{chosen.label}: {checked.fallback}, but not for this model")
        choice = dataclasses.replace(safe, reason=f"{safe.reason} ({checked.fallback})")
    return choice


def compiled_for_file(path: Path, model_format: str) -> str | None:
    """The accelerator ``path`` was compiled for, as the backends of its format read it (None: any)."""
    if not path.is_file():
        return None
    return next((c for b in registry.backends_for(model_format) if (c := b.compiled_for(path))), None)


def chooser(facts: HardwareFacts, path: Path, backend: str = AUTO, accelerator: str = AUTO):
    """``choose(format) -> RuntimeChoice`` for the model at ``path``, as load_model takes it."""
    return lambda model_format: choose_runtime(facts, model_format, backend, accelerator,
                                               compiled_for=compiled_for_file(path, model_format))
