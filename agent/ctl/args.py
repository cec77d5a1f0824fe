"""Argument types for agent-ctl: a bad number is a usage error (exit 2, argparse's one line), never a traceback."""

from __future__ import annotations

import argparse
from collections.abc import Callable


def number(kind: type, *, low: float | None = None, high: float | None = None, above: float | None = None
           ) -> Callable[[str], float]:
    """An argparse ``type`` for an int or float in a range: ``low``/``high`` inclusive, ``above`` exclusive."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, "
                                             f"got {text!r}") from None
        if value != value or value in (float("inf"), float("-inf")):  # nan, inf
            raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
        if above is not None and not value > above:
            raise argparse.ArgumentTypeError(f"must be more than {above:g}, got {text}")
        if low is not None and value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low:g}, got {text}")
        if high is not None and value > high:
            raise argparse.ArgumentTypeError(f"must be at most {high:g}, got {text}")
        return value

    return parse


SECONDS = number(float, above=0)  # a timeout or a duration: 0 or less would never wait or never end
SECONDS_OR_ZERO = number(float, low=0)
COUNT = number(int, low=0)
