"""agent-ctl's errors and exit codes: 0 success, 1 the operation failed, 2 bad usage or bad input."""

from __future__ import annotations

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


class CtlError(Exception):
    """An operation failed (exit 1); the message is for the user."""


class UsageError(Exception):
    """Bad usage or bad input (exit 2)."""
