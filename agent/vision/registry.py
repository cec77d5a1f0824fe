"""The task decoders, found rather than listed: every module in agent/vision/tasks/ that defines ``TASK``.

A task turns a model's raw outputs into results (classes, boxes, tensor summaries). Adding one is
adding that file (see docs/architecture.md); ``register`` adds one from outside the package.
"""

from __future__ import annotations

import importlib
import pkgutil
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np

from agent.runtimes.base import TensorSpec
from agent.vision.geometry import Geometry
from agent.vision.params import DecodeParams
from agent.vision.results import Result
from agent.vocab import one_of

# One frame's outputs (as the runtime returned them, batch dimension included) -> results.
Decoder = Callable[[list[np.ndarray], Geometry], list[Result]]


def _no_hints(metadata: Mapping[str, str]) -> tuple[tuple[str, ...] | None, tuple[int, int] | None]:
    return None, None


@dataclass(frozen=True)
class Task:
    """A model family's decoding: its name (model.task, model.yaml's task:), and how to bind a decoder.

    ``bind(output_specs, params)`` returns the decoder for one loaded model; the specs carry the
    outputs' names, shapes and int8/uint8 quantisation. ``hints`` reads labels and an input size
    (height, width) from the model file's metadata, for families whose exports carry them.
    """

    name: str
    bind: Callable[[list[TensorSpec], DecodeParams], Decoder]
    hints: Callable[[Mapping[str, str]], tuple[tuple[str, ...] | None, tuple[int, int] | None]] = _no_hints


_lock = threading.Lock()
_tasks: dict[str, Task] = {}
_found = False


def _discover() -> None:
    global _found
    with _lock:
        if _found:
            return
        package = importlib.import_module("agent.vision.tasks")
        for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda i: i.name):
            task = getattr(importlib.import_module(f"agent.vision.tasks.{info.name}"), "TASK", None)
            if task is not None:
                _tasks.setdefault(task.name, task)
        _found = True


def register(task: Task) -> None:
    """Add a task from outside agent/vision/tasks/ (a taken name is an error)."""
    _discover()
    with _lock:
        if task.name in _tasks:
            raise ValueError(f"a task named {task.name!r} is already registered")
        _tasks[task.name] = task


def unregister(name: str) -> None:
    """Remove a task added with ``register`` (tests clean up with it)."""
    with _lock:
        _tasks.pop(name, None)


def task(name: str) -> Task:
    """The task called ``name``; ValueError names the ones there are."""
    _discover()
    try:
        return _tasks[name]
    except KeyError:
        raise ValueError(f"unknown task {name!r}; expected {one_of(tuple(_tasks))}") from None


def task_names() -> tuple[str, ...]:
    _discover()
    return tuple(_tasks)


def check_task(name: str | None) -> str | None:
    """A pydantic validator's body: ``name`` when it is a registered task (None passes)."""
    if name is not None and name not in task_names():
        raise ValueError(f"expected {one_of(task_names())}, got {name!r}")
    return name
