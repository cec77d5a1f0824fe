"""Readings that change while the agent runs: temperatures, the Pi's throttling word, the Jetson GPU's load.

Each is read from a filesystem root (default "/") so it runs on fixture trees; where a reading
needs a search (sysfs), the search is a function of its own that a sampler calls once.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

THROTTLE_BITS = {
    "under_voltage": 0, "arm_freq_capped": 1, "throttled": 2, "soft_temp_limit": 3,
    "under_voltage_occurred": 16, "arm_freq_capped_occurred": 17,
    "throttled_occurred": 18, "soft_temp_limit_occurred": 19,
}


def read_text(path: Path) -> str | None:
    """File text, or None when missing/unreadable (absent fact, never an error)."""
    try:
        return path.read_bytes().decode("utf-8", "replace")
    except OSError:
        return None


@dataclass(frozen=True)
class Throttled:
    """Raspberry Pi firmware ``get_throttled`` word with its bits decoded."""

    raw: int
    under_voltage: bool = False
    arm_freq_capped: bool = False
    throttled: bool = False
    soft_temp_limit: bool = False
    under_voltage_occurred: bool = False
    arm_freq_capped_occurred: bool = False
    throttled_occurred: bool = False
    soft_temp_limit_occurred: bool = False

    @classmethod
    def from_raw(cls, raw: int) -> Throttled:
        return cls(raw, **{name: bool(raw >> bit & 1) for name, bit in THROTTLE_BITS.items()})

    @property
    def active_flags(self) -> list[str]:
        return [name for name in THROTTLE_BITS if getattr(self, name)]

    def to_json(self) -> dict:
        return {"raw": hex(self.raw), **{name: getattr(self, name) for name in THROTTLE_BITS}}


def thermal_zones(root: str | Path = "/") -> list[Path]:
    """The thermal zone directories, in zone order (a health sampler finds them once)."""
    return sorted(Path(root).glob("sys/class/thermal/thermal_zone*"), key=lambda p: int(re.sub(r"\D", "", p.name) or 0))


def read_temperatures(root: str | Path = "/", zones: list[Path] | None = None) -> dict[str, float]:
    """Zone type → °C for every readable thermal zone (duplicate types get the zone name appended)."""
    if zones is None:
        zones = thermal_zones(root)
    temps: dict[str, float] = {}
    for zone in zones:
        kind, temp = read_text(zone / "type"), read_text(zone / "temp")
        try:
            celsius = int(temp.strip()) / 1000.0  # type: ignore[union-attr]
        except (AttributeError, ValueError):
            continue  # some zones return EINVAL or nothing while their sensor is off
        name = (kind or "").strip() or zone.name
        temps[f"{name} ({zone.name})" if name in temps else name] = celsius
    return temps


def throttled_path(root: str | Path = "/") -> Path | None:
    """Where the firmware's throttling word is on a Raspberry Pi, None elsewhere.

    The search walks sysfs (hundreds of entries on a Pi), so a health sampler does it once.
    """
    platform_dir = Path(root) / "sys/devices/platform"
    candidates = [platform_dir / "soc/soc:firmware/get_throttled"]
    # Firmware node naming differs by kernel/board (e.g. Pi 5's soc@107c000000); bounded depth keeps it cheap.
    for depth in range(1, 4):
        candidates += sorted(platform_dir.glob("*/" * depth + "get_throttled"))
    return next((p for p in candidates if read_text(p) is not None), None)


def read_throttled(root: str | Path = "/", path: Path | None = None) -> Throttled | None:
    """Decoded firmware throttling word on a Raspberry Pi (at ``path`` if known), None elsewhere."""
    path = path or throttled_path(root)
    text = read_text(path) if path is not None else None
    try:
        return Throttled.from_raw(int(text.strip(), 16)) if text is not None else None
    except ValueError:
        return None


def jetson_gpu_load(root: str | Path = "/") -> dict | None:
    """Jetson iGPU load (0-1000 in sysfs → percent); None elsewhere."""
    for rel in ("sys/devices/platform/gpu.0/load", "sys/devices/gpu.0/load",
                "sys/devices/platform/17000000.gpu/load", "sys/devices/platform/bus@0/17000000.gpu/load"):
        p = Path(root) / rel
        try:
            return {"load_percent": int(p.read_text().strip()) / 10.0}
        except (OSError, ValueError):
            continue
    return None
