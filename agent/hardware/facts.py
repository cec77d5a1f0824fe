"""Hardware facts read from a filesystem root (default "/"), so every parser runs on fixture trees.

The platform (Raspberry Pi model from the device tree, Jetson module and L4T release, otherwise
generic), CPUs, memory, accelerator devices and libraries. Which runtimes work is a fact too
(``HardwareFacts.runtimes``); the runtime backends check that themselves (agent.runtimes.probe).
"""

from __future__ import annotations

import os
import platform as _platform
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

from agent.hardware.sensors import Throttled, read_temperatures, read_text, read_throttled

TEGRA_SOCS = {
    "tegra210": "Jetson Nano/TX1 (tegra210)",
    "tegra186": "Jetson TX2 (tegra186)",
    "tegra194": "Jetson Xavier (tegra194)",
    "tegra234": "Jetson Orin (tegra234)",
}
LIBEDGETPU_DIRS = ("usr/lib", "usr/lib/x86_64-linux-gnu", "usr/lib/aarch64-linux-gnu",
                   "usr/lib/arm-linux-gnueabihf", "usr/local/lib")
# Coral USB enumerates as Global Unichip 1a6e:089a until its firmware loads, then as Google 18d1:9302.
CORAL_USB_IDS = {("1a6e", "089a"), ("18d1", "9302")}
GPU_NODES = ("dev/nvidia0", "dev/nvhost-gpu", "dev/nvgpu/igpu0", "dev/dri/renderD128")


@dataclass(frozen=True)
class RuntimeAvailability:
    """Whether one runtime module works here: version when it does, error text when not."""

    name: str
    available: bool
    version: str | None = None
    error: str | None = None
    providers: tuple[str, ...] = ()
    fallback: str | None = None  # why it works only in its backend's safe mode (its check crashed without)

    def to_json(self) -> dict:
        return {**asdict(self), "providers": list(self.providers)}


@dataclass(frozen=True)
class HardwareFacts:
    """Everything the probe learned; ``runtimes`` is empty when runtimes were not checked."""

    platform: str  # "raspberry-pi" | "jetson" | "generic"
    model: str
    arch: str
    cpu_count: int | None = None
    memory_mb: int | None = None
    soc: str | None = None  # e.g. "tegra234"
    l4t_release: str | None = None  # e.g. "36.3.0"
    thermal: tuple[tuple[str, float], ...] = ()
    throttled: Throttled | None = None
    edgetpu_library: bool = False
    edgetpu_devices: tuple[str, ...] = ()  # e.g. "pcie:/dev/apex_0", "usb:18d1:9302"
    gpu_devices: tuple[str, ...] = ()
    runtimes: Mapping[str, RuntimeAvailability] = field(default_factory=dict)

    @property
    def has_edgetpu(self) -> bool:
        # The delegate needs both the user-space library and a device to talk to.
        return self.edgetpu_library and bool(self.edgetpu_devices)

    def to_json(self) -> dict:
        data = {k: v for k, v in asdict(self).items() if k not in ("throttled", "runtimes", "thermal")}
        return {
            **data,
            "edgetpu_devices": list(self.edgetpu_devices),
            "gpu_devices": list(self.gpu_devices),
            "has_edgetpu": self.has_edgetpu,
            "thermal": dict(self.thermal),
            "throttled": self.throttled.to_json() if self.throttled else None,
            "runtimes": {name: r.to_json() for name, r in self.runtimes.items()},
        }


def _device_tree(root: Path, name: str) -> str | None:
    for base in ("proc/device-tree", "sys/firmware/devicetree/base"):
        text = read_text(root / base / name)
        if text is not None:
            return text
    return None


def _parse_l4t(text: str | None) -> tuple[str | None, str | None]:
    """(release "32.7.1", EABI arch) from the first line of /etc/nv_tegra_release."""
    if not text:
        return None, None
    line = text.splitlines()[0] if text.splitlines() else ""
    m = re.search(r"R(\d+)\s*\(release\),\s*REVISION:\s*(\d+)(?:\.(\d+))?", line)
    release = f"{m[1]}.{m[2]}.{m[3] or 0}" if m else None
    eabi = re.search(r"EABI:\s*(\w+)", line)
    return release, eabi[1] if eabi else None


def _count_cpus(cpuinfo: str | None) -> int | None:
    if cpuinfo is None:
        return None
    return len(re.findall(r"^processor\s*:\s*\d+", cpuinfo, re.MULTILINE)) or None


def _memory_mb(meminfo: str | None) -> int | None:
    m = re.search(r"^MemTotal:\s*(\d+)\s*kB", meminfo or "", re.MULTILINE)
    return int(m[1]) // 1024 if m else None


def _edgetpu_devices(root: Path) -> tuple[str, ...]:
    found = [f"pcie:/{p.relative_to(root)}" for p in sorted(root.glob("dev/apex_*"))]
    for dev in sorted(root.glob("sys/bus/usb/devices/*")):
        ids = (read_text(dev / "idVendor"), read_text(dev / "idProduct"))
        if None not in ids:
            vendor, product = (s.strip().lower() for s in ids)  # type: ignore[union-attr]
            if (vendor, product) in CORAL_USB_IDS:
                found.append(f"usb:{vendor}:{product}")
    return tuple(found)


def read_facts(root: str | Path = "/", *, arch: str | None = None) -> HardwareFacts:
    """The hardware facts under ``root``; ``runtimes`` is left empty (agent.runtimes.probe fills it)."""
    root = Path(root)
    is_host = root.resolve() == Path("/")
    dt_model = (_device_tree(root, "model") or "").replace("\x00", "").strip() or None
    compatible = [c for c in (_device_tree(root, "compatible") or "").split("\x00") if c]
    l4t, eabi = _parse_l4t(read_text(root / "etc/nv_tegra_release"))
    soc = next((c.split(",", 1)[1] for c in compatible if c.startswith("nvidia,tegra")), None)
    if l4t or soc:
        kind, model = "jetson", dt_model or TEGRA_SOCS.get(soc or "", "NVIDIA Jetson")
    elif dt_model and dt_model.startswith("Raspberry Pi"):
        kind, model = "raspberry-pi", dt_model
    else:
        kind, model = "generic", dt_model or "generic Linux"
    cpus = _count_cpus(read_text(root / "proc/cpuinfo"))
    return HardwareFacts(
        platform=kind,
        model=model,
        arch=arch or eabi or _platform.machine(),
        cpu_count=cpus if cpus or not is_host else os.cpu_count(),
        memory_mb=_memory_mb(read_text(root / "proc/meminfo")),
        soc=soc,
        l4t_release=l4t,
        thermal=tuple(read_temperatures(root).items()),
        throttled=read_throttled(root),
        edgetpu_library=any((root / d / "libedgetpu.so.1").exists() for d in LIBEDGETPU_DIRS),
        edgetpu_devices=_edgetpu_devices(root),
        gpu_devices=tuple(f"/{n}" for n in GPU_NODES if (root / n).exists()),
    )
