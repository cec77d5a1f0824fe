"""The words every room shares: deployment states, the id and version patterns, accelerators.

Each is defined here once and imported. Tasks, model formats and backends are not listed here: they
are whatever the registries find (``agent.vision.registry``, ``agent.runtimes.registry``), so adding
one is adding a file.
"""

from __future__ import annotations

import re
from typing import Literal, get_args

# -- deployments --------------------------------------------------------------------------------
DeployState = Literal["received", "downloading", "verifying", "validating", "activating", "active", "committed",
                      "rejected", "failed", "rolled_back"]
# An outcome: the deployment is over (committed: it passed probation).
TERMINAL_STATES: frozenset[str] = frozenset({"committed", "rejected", "failed", "rolled_back"})
# Never applied again: an outcome, or active (serving, in probation; a restart resumes the probation).
APPLIED_STATES: frozenset[str] = TERMINAL_STATES | {"active"}
# Outcomes that are failures (logged as warnings, reported by agent-ctl with the reason).
FAILED_STATES: frozenset[str] = frozenset({"rejected", "failed", "rolled_back"})

# Deployment ids and model names: no '/', no '..' at the start, so they cannot escape a directory.
ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
VERSION_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,63}$"
SHA256_PATTERN = r"^[0-9a-f]{64}$"
_ID = re.compile(ID_PATTERN)


def is_safe_id(value: object) -> bool:
    """Whether ``value`` is a usable deployment id or model name (a string matching ID_PATTERN)."""
    return isinstance(value, str) and _ID.fullmatch(value) is not None


# -- commands on <device>/cmd ---------------------------------------------------------------------
# With deploy.trusted_keys set these change the device's state, so they need a signature as deployments do.
STATE_CHANGING_COMMANDS = ("rollback", "reload")

# -- runtime choice -----------------------------------------------------------------------------
AUTO = "auto"
# What runtime.accelerator accepts. Status may also report xnnpack: TFLite's CPU path, not a choice.
Accelerator = Literal["auto", "cpu", "edgetpu", "cuda", "tensorrt"]
ACCELERATORS: tuple[str, ...] = tuple(a for a in get_args(Accelerator) if a != AUTO)


def one_of(values: tuple[str, ...] | list[str]) -> str:
    """``'a', 'b' or 'c'``: how an error lists what is allowed (the way pydantic words a Literal)."""
    quoted = [repr(v) for v in values]
    return quoted[0] if len(quoted) == 1 else f"{', '.join(quoted[:-1])} or {quoted[-1]}"
