"""Build fake filesystem roots for agent.hardware.probe in the real formats of /proc, /sys, /dev and /etc."""

from __future__ import annotations

from pathlib import Path

ARM_CORE = (
    "processor\t: {n}\nBogoMIPS\t: 108.00\nFeatures\t: fp asimd evtstrm crc32 cpuid\n"
    "CPU implementer\t: 0x41\nCPU architecture: 8\nCPU variant\t: 0x0\nCPU part\t: 0xd08\nCPU revision\t: 3\n\n"
)
X86_CORE = (
    "processor\t: {n}\nvendor_id\t: GenuineIntel\ncpu family\t: 6\nmodel\t\t: 85\n"
    "model name\t: Intel(R) Xeon(R) CPU @ 2.20GHz\nphysical id\t: 0\nsiblings\t: 2\ncore id\t\t: {n}\n"
    "cpu cores\t: 2\nflags\t\t: fpu vme de pse tsc msr pae mce cx8 apic sep mtrr avx2\n\n"
)
NANO_RELEASE = (
    "# R32 (release), REVISION: 7.1, GCID: 29818004, BOARD: t210ref, EABI: aarch64, "
    "DATE: Sat Feb 19 17:05:08 UTC 2022\n# KERNEL_VARIANT: oot\nTARGET_USERSPACE_LIB_DIR=nvidia\n"
    "TARGET_USERSPACE_LIB_DIR_PATH=usr/lib/aarch64-linux-gnu/tegra\n"
)
ORIN_RELEASE = (
    "# R36 (release), REVISION: 3.0, GCID: 36923193, BOARD: generic, EABI: aarch64, "
    "DATE: Fri Jul 19 23:24:25 UTC 2024\n# KERNEL_VARIANT: oot\nTARGET_USERSPACE_LIB_DIR=nvidia\n"
    "TARGET_USERSPACE_LIB_DIR_PATH=usr/lib/aarch64-linux-gnu/nvidia\n"
)


def write_tree(root: Path, files: dict[str, str | bytes]) -> Path:
    """Write each relative path with its content (device nodes are stood in for by empty files)."""
    for rel, content in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content)
    return root


def cpuinfo(cores: int, template: str = ARM_CORE, trailer: str = "") -> str:
    return "".join(template.format(n=n) for n in range(cores)) + trailer


def meminfo(total_kb: int) -> str:
    return f"MemTotal:       {total_kb:>8} kB\nMemFree:        {total_kb // 2:>8} kB\nMemAvailable:   {total_kb // 3 * 2:>8} kB\n"


def thermal_zones(zones: list[tuple[str, str]]) -> dict[str, str]:
    files: dict[str, str] = {}
    for i, (kind, millideg) in enumerate(zones):
        files[f"sys/class/thermal/thermal_zone{i}/type"] = f"{kind}\n"
        files[f"sys/class/thermal/thermal_zone{i}/temp"] = f"{millideg}\n"
    return files


def raspberry_pi_4(root: Path) -> Path:
    return write_tree(root, {
        "proc/device-tree/model": b"Raspberry Pi 4 Model B Rev 1.4\x00",
        "proc/device-tree/compatible": b"raspberrypi,4-model-b\x00brcm,bcm2711\x00",
        "proc/cpuinfo": cpuinfo(4, trailer="Hardware\t: BCM2835\nRevision\t: c03114\n"
                                           "Model\t\t: Raspberry Pi 4 Model B Rev 1.4\n"),
        "proc/meminfo": meminfo(3884376),
        **thermal_zones([("cpu-thermal", "48312")]),
        "sys/devices/platform/soc/soc:firmware/get_throttled": "50005\n",
    })


def raspberry_pi_5(root: Path) -> Path:
    # The firmware node sits under a differently named soc node here, so only the glob fallback finds it.
    return write_tree(root, {
        "sys/firmware/devicetree/base/model": b"Raspberry Pi 5 Model B Rev 1.0\x00",
        "proc/cpuinfo": cpuinfo(4),
        "proc/meminfo": meminfo(8245916),
        **thermal_zones([("cpu-thermal", "51950")]),
        "sys/devices/platform/soc@107c000000/soc@107c000000:firmware/get_throttled": "0\n",
    })


def jetson_nano(root: Path) -> Path:
    return write_tree(root, {
        "etc/nv_tegra_release": NANO_RELEASE,
        "proc/device-tree/model": b"NVIDIA Jetson Nano Developer Kit\x00",
        "proc/device-tree/compatible": b"nvidia,p3450-0000\x00nvidia,jetson-nano\x00nvidia,tegra210\x00",
        "proc/cpuinfo": cpuinfo(4),
        "proc/meminfo": meminfo(4051060),
        **thermal_zones([("AO-therm", "37500"), ("CPU-therm", "33500"), ("GPU-therm", "33000"),
                         ("PLL-therm", "32000"), ("PMIC-Die", "100000"), ("thermal-fan-est", "33400")]),
        "dev/nvhost-gpu": "",
    })


def jetson_orin(root: Path) -> Path:
    return write_tree(root, {
        "etc/nv_tegra_release": ORIN_RELEASE,
        "proc/device-tree/model": b"NVIDIA Jetson Orin Nano Developer Kit\x00",
        "proc/device-tree/compatible": b"nvidia,p3768-0000+p3767-0005\x00nvidia,p3767-0005\x00nvidia,tegra234\x00",
        "proc/cpuinfo": cpuinfo(6),
        "proc/meminfo": meminfo(7802128),
        **thermal_zones([("cpu-thermal", "45281"), ("gpu-thermal", "44343"), ("tj-thermal", "46125")]),
        "dev/nvgpu/igpu0/ctrl": "",
    })


def x86_64_box(root: Path) -> Path:
    return write_tree(root, {
        "proc/cpuinfo": cpuinfo(2, X86_CORE),
        "proc/meminfo": meminfo(16318204),
        **thermal_zones([("acpitz", "27800"), ("x86_pkg_temp", "41000")]),
        # A root hub and an interface directory without ids: neither is a Coral.
        "sys/bus/usb/devices/usb1/idVendor": "1d6b\n",
        "sys/bus/usb/devices/usb1/idProduct": "0002\n",
        "sys/bus/usb/devices/1-0:1.0/bInterfaceClass": "09\n",
    })


def coral_usb(root: Path, vendor: str = "18d1", product: str = "9302") -> Path:
    return write_tree(root, {
        "sys/bus/usb/devices/2-1/idVendor": f"{vendor}\n",
        "sys/bus/usb/devices/2-1/idProduct": f"{product}\n",
    })


def libedgetpu(root: Path, libdir: str = "usr/lib/x86_64-linux-gnu") -> Path:
    return write_tree(root, {f"{libdir}/libedgetpu.so.1": b"\x7fELF"})


def coral_pcie(root: Path) -> Path:
    return write_tree(root, {"dev/apex_0": ""})
