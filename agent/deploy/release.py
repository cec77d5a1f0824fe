"""What binds a signed manifest to one release for one target, as TUF and Uptane do.

The signed body names its target (device ids or a group), when it was issued and when it expires,
the key that signed it, and a release counter. A device refuses a manifest for another target, one
that has expired, and one whose counter is not above the highest it has accepted (kept on disk), so
a signed manifest cannot be replayed to other devices, later, or to roll a device back: going back
to old bytes on purpose is a new manifest with a higher counter.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

from agent.deploy.manifest import DeploymentManifest, ManifestRejected

log = logging.getLogger(__name__)
DEFAULT_EXPIRES_S = 7 * 24 * 3600  # agent-ctl deploy --expires-in


@dataclass(frozen=True)
class Arrival:
    """Where a manifest came to this device: its device id, its groups, and the group whose topic it came on
    (None: the device's own deploy topic)."""

    device_id: str
    groups: tuple[str, ...]
    group_topic: str | None


def check_release(m: DeploymentManifest, arrival: Arrival, *, signed_required: bool, highest: Accepted | None,
                  now: float | None = None) -> None:
    """ManifestRejected unless ``m`` is for this device, unexpired and newer than what it accepted.

    With trusted keys (``signed_required``) target, expiry and counter must all be there; without,
    each is checked when present.
    """
    now = time.time() if now is None else now
    if signed_required:
        missing = [k for k in ("target", "expires_at", "counter") if getattr(m, k) is None]
        if missing:
            raise ManifestRejected(f"signed manifests must name {', '.join(missing)} (agent-ctl deploy does)")
    if m.target is not None:
        _check_target(m, arrival)
    if m.expires_at is not None and now > m.expires_at:
        raise ManifestRejected(f"expired at {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime(m.expires_at))}")
    if m.counter is not None and highest is not None and m.deployment_id != highest.deployment_id:
        if m.counter <= highest.counter:
            raise ManifestRejected(f"release counter {m.counter} is not above {highest.counter}, the highest this "
                                   "device accepted (a replay or a downgrade; deploy again for a new counter)")


def _check_target(m: DeploymentManifest, arrival: Arrival) -> None:
    t = m.target
    assert t is not None
    if t.group is not None:
        if arrival.group_topic != t.group or t.group not in arrival.groups:
            where = f"group {arrival.group_topic}'s topic" if arrival.group_topic else "this device's own topic"
            raise ManifestRejected(f"signed for group {t.group}, published on {where}")
    elif arrival.group_topic is not None or arrival.device_id not in (t.devices or ()):
        names = ", ".join((t.devices or [])[:5]) + (" …" if len(t.devices or []) > 5 else "")
        raise ManifestRejected(f"signed for device(s) {names}, not {arrival.device_id}"
                               + (f" on group {arrival.group_topic}'s topic" if arrival.group_topic else ""))


def supersedes(candidate: DeploymentManifest, downloading: DeploymentManifest, *, finished) -> bool:
    """Whether a verified ``candidate`` replaces the download in progress: another deployment, not
    finished here, and made later. A stale retained manifest re-delivered after a broker restart (a
    group's older one) does not; nothing unverified gets this far."""
    if candidate.deployment_id == downloading.deployment_id or finished(candidate.deployment_id):
        return False
    return downloading.created is None or (candidate.created or 0.0) > downloading.created


@dataclass(frozen=True)
class Accepted:
    counter: int
    deployment_id: str


class ReleaseCounter:
    """The highest release counter this device accepted, and for which deployment, kept across restarts."""

    def __init__(self, path: Path):
        self.path = path
        self.highest: Accepted | None = None
        try:
            data = json.loads(path.read_text())
            self.highest = Accepted(int(data["counter"]), str(data["deployment_id"]))
        except FileNotFoundError:
            pass
        except (OSError, ValueError, KeyError, TypeError) as exc:
            # Unreadable: refusing every deployment would brick the device; say so and start again.
            log.error("release counter %s unreadable (%s); starting from none", path, exc)

    def accept(self, m: DeploymentManifest) -> None:
        """Record ``m``'s counter as the highest accepted (atomically, before anything is applied)."""
        if m.counter is None or (self.highest is not None and m.counter <= self.highest.counter):
            return
        tmp = self.path.with_suffix(".tmp")
        try:
            tmp.write_text(json.dumps({"counter": m.counter, "deployment_id": m.deployment_id}))
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise OSError(exc.errno, f"cannot record the release counter in {self.path}: "
                                     f"{exc.strerror or exc}") from None
        self.highest = Accepted(m.counter, m.deployment_id)
