"""The task decoders, found rather than listed: every module in agent/vision/tasks/ that defines ``TASK``.

A task turns a model's raw outputs into results (classes, boxes, tensor summaries). Adding one is
adding that file (see docs/architecture.md); ``register`` adds one from outside the package.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np

from agent.runtimes.base import TensorSpec
from agent.support.registry import Registry
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


_tasks: Registry[Task] = Registry("agent.vision.tasks", "TASK", "task")
register = _tasks.register
unregister = _tasks.unregister


def task(name: str) -> Task:
    """The task called ``name``; ValueError names the ones there are."""
    found = _tasks.get(name)
    if found is None:
        raise ValueError(f"unknown task {name!r}; expected {one_of(task_names())}")
    return found


def task_names() -> tuple[str, ...]:
    return _tasks.names()


def check_task(name: str | None) -> str | None:
    """A pydantic validator's body: ``name`` when it is a registered task (None passes)."""
    if name is not None and name not in task_names():
        raise ValueError(f"expected {one_of(task_names())}, got {name!r}")
    return name
