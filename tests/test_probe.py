"""Contracts of agent.hardware.probe: facts parsed from real-format fixture trees, and runtime choice rules."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types
from dataclasses import replace

import probe_fixtures as fx
import pytest
from conftest import REPO

from agent.ctl.local import format_report
from agent.hardware.facts import HardwareFacts, RuntimeAvailability
from agent.hardware.sensors import read_temperatures, read_throttled
from agent.runtimes import inference_threads
from agent.runtimes import tflite as tflite_mod
from agent.runtimes.base import RuntimeChoice, RuntimeChoiceError
from agent.runtimes.choice import choose_runtime, probe
from agent.runtimes.tflite import is_edgetpu_model

CPU_ORT = RuntimeAvailability("onnxruntime", True, "1.31.1", providers=("CPUExecutionProvider",))
GPU_ORT = RuntimeAvailability(
    "onnxruntime", True, "1.18.0",
    providers=("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"),
)
CUDA_ORT = RuntimeAvailability("onnxruntime", True, "1.18.0",
                               providers=("CUDAExecutionProvider", "CPUExecutionProvider"))
LITERT = RuntimeAvailability("ai_edge_litert", True, "2.3.0")
BROKEN_TFLITE_RUNTIME = RuntimeAvailability("tflite_runtime", False, error="numpy ABI")
MISSING_LITERT = RuntimeAvailability("ai_edge_litert", False, error="ModuleNotFoundError: No module named 'ai_edge_litert'")
MISSING_TF = RuntimeAvailability("tensorflow.lite", False, error="ModuleNotFoundError: No module named 'tensorflow'")


def with_runtimes(facts: HardwareFacts, *runtimes: RuntimeAvailability) -> HardwareFacts:
    return replace(facts, runtimes={r.name: r for r in runtimes})


@pytest.fixture
def x86(tmp_path) -> HardwareFacts:
    return probe(fx.x86_64_box(tmp_path), check_runtimes=False, arch="x86_64")


# ---------------------------------------------------------------- platform facts


def test_pi4_is_identified_from_device_tree_model(tmp_path):
    facts = probe(fx.raspberry_pi_4(tmp_path), check_runtimes=False)
    assert facts.platform == "raspberry-pi"
    assert facts.model == "Raspberry Pi 4 Model B Rev 1.4"  # trailing NUL stripped
    assert facts.cpu_count == 4
    assert facts.memory_mb == 3884376 // 1024
    assert facts.thermal == (("cpu-thermal", pytest.approx(48.312)),)
    assert facts.soc is None and facts.l4t_release is None


def test_pi4_reports_undervoltage_from_get_throttled(tmp_path):
    throttled = read_throttled(fx.raspberry_pi_4(tmp_path))
    assert throttled is not None and throttled.raw == 0x50005
    assert throttled.under_voltage and throttled.throttled
    assert throttled.under_voltage_occurred and throttled.throttled_occurred
    assert not (throttled.arm_freq_capped or throttled.soft_temp_limit)
    assert not (throttled.arm_freq_capped_occurred or throttled.soft_temp_limit_occurred)
    assert throttled.active_flags == ["under_voltage", "throttled", "under_voltage_occurred", "throttled_occurred"]


def test_pi5_zero_get_throttled_found_by_glob_means_no_flags(tmp_path):
    facts = probe(fx.raspberry_pi_5(tmp_path), check_runtimes=False)
    assert facts.platform == "raspberry-pi"
    assert facts.model == "Raspberry Pi 5 Model B Rev 1.0"  # from the /sys/firmware/devicetree fallback
    assert facts.throttled is not None and facts.throttled.raw == 0
    assert facts.throttled.active_flags == []


def test_jetson_nano_reports_l4t_soc_and_nvhost_gpu(tmp_path):
    facts = probe(fx.jetson_nano(tmp_path), check_runtimes=False)
    assert facts.platform == "jetson"
    assert facts.model == "NVIDIA Jetson Nano Developer Kit"
    assert facts.l4t_release == "32.7.1"
    assert facts.soc == "tegra210"
    assert facts.arch == "aarch64"  # from the EABI field, not the test machine
    assert facts.gpu_devices == ("/dev/nvhost-gpu",)
    assert dict(facts.thermal)["CPU-therm"] == pytest.approx(33.5)
    assert len(facts.thermal) == 6
    assert facts.throttled is None


def test_jetson_orin_reports_l4t_36_and_nvgpu_node(tmp_path):
    facts = probe(fx.jetson_orin(tmp_path), check_runtimes=False)
    assert (facts.platform, facts.l4t_release, facts.soc) == ("jetson", "36.3.0", "tegra234")
    assert facts.model == "NVIDIA Jetson Orin Nano Developer Kit"
    assert facts.gpu_devices == ("/dev/nvgpu/igpu0",)
    assert facts.cpu_count == 6


def test_jetson_without_model_file_is_named_after_its_soc(tmp_path):
    fx.jetson_orin(tmp_path)
    (tmp_path / "proc/device-tree/model").unlink()
    (tmp_path / "etc/nv_tegra_release").unlink()  # compatible alone still identifies a Jetson
    facts = probe(tmp_path, check_runtimes=False)
    assert facts.platform == "jetson"
    assert facts.model == "Jetson Orin (tegra234)"
    assert facts.l4t_release is None


def test_x86_box_is_generic_with_cpuinfo_counts(x86):
    assert x86.platform == "generic"
    assert x86.arch == "x86_64"
    assert x86.cpu_count == 2
    assert x86.memory_mb == 16318204 // 1024
    assert x86.throttled is None
    assert x86.edgetpu_devices == () and not x86.has_edgetpu
    assert x86.gpu_devices == ()


def test_empty_root_gives_absent_facts_not_errors(tmp_path):
    facts = probe(tmp_path, check_runtimes=False, arch="riscv64")
    assert (facts.platform, facts.arch) == ("generic", "riscv64")
    assert facts.cpu_count is None  # no os.cpu_count() fallback for a fixture root
    assert facts.memory_mb is None
    assert facts.thermal == () and facts.throttled is None
    assert facts.runtimes == {}


def test_temperatures_skip_unreadable_zones_and_disambiguate_duplicates(tmp_path):
    fx.write_tree(tmp_path, {
        **fx.thermal_zones([("acpitz", "27800"), ("acpitz", "29800"), ("iwlwifi_1", "")]),
        "sys/class/thermal/thermal_zone10/type": "x86_pkg_temp\n",
        "sys/class/thermal/thermal_zone10/temp": "41000\n",
    })
    assert read_temperatures(tmp_path) == {
        "acpitz": pytest.approx(27.8),
        "acpitz (thermal_zone1)": pytest.approx(29.8),
        "x86_pkg_temp": pytest.approx(41.0),
    }


@pytest.mark.parametrize(("vendor", "product"), [("18d1", "9302"), ("1a6e", "089a")])
def test_coral_usb_is_detected_by_vendor_and_product_id(tmp_path, vendor, product):
    fx.x86_64_box(tmp_path)
    fx.coral_usb(tmp_path, vendor, product)
    fx.libedgetpu(tmp_path)
    facts = probe(tmp_path, check_runtimes=False)
    assert facts.edgetpu_devices == (f"usb:{vendor}:{product}",)
    assert facts.has_edgetpu


def test_coral_pcie_needs_libedgetpu_to_be_usable(tmp_path):
    fx.coral_pcie(fx.raspberry_pi_5(tmp_path))
    without_lib = probe(tmp_path, check_runtimes=False)
    assert without_lib.edgetpu_devices == ("pcie:/dev/apex_0",)
    assert not without_lib.has_edgetpu
    fx.libedgetpu(tmp_path, "usr/lib/aarch64-linux-gnu")
    assert probe(tmp_path, check_runtimes=False).has_edgetpu


def test_to_json_is_serialisable_and_carries_throttle_flags(tmp_path):
    facts = with_runtimes(probe(fx.raspberry_pi_4(tmp_path), check_runtimes=False), LITERT, CPU_ORT)
    data = json.loads(json.dumps(facts.to_json()))
    assert data["platform"] == "raspberry-pi"
    assert data["throttled"]["raw"] == "0x50005" and data["throttled"]["under_voltage"] is True
    assert data["thermal"] == {"cpu-thermal": pytest.approx(48.312)}
    assert data["runtimes"]["onnxruntime"]["providers"] == ["CPUExecutionProvider"]


# ---------------------------------------------------------------- runtime checks


def test_tflite_module_that_imports_but_cannot_build_interpreter_is_unavailable(monkeypatch, tmp_path):
    class NumpyAbiInterpreter:
        def __init__(self, model_path):
            raise RuntimeError("module compiled against ABI version 0x1000009 but this version of numpy is 0x2000000")

    fake = types.ModuleType("tflite_runtime")
    fake.__version__ = "2.14.0"
    fake_interp = types.ModuleType("tflite_runtime.interpreter")
    fake_interp.Interpreter = NumpyAbiInterpreter
    monkeypatch.setitem(sys.modules, "tflite_runtime", fake)
    monkeypatch.setitem(sys.modules, "tflite_runtime.interpreter", fake_interp)
    model = tmp_path / "m.tflite"
    model.write_bytes(b"TFL3")
    monkeypatch.setattr(tflite_mod, "probe_model_path", lambda: model)
    result = tflite_mod.check_module.__wrapped__("tflite_runtime")  # bypass the process cache
    assert not result.available
    assert "numpy" in result.error and result.error.startswith("RuntimeError")


def test_real_machine_probe_finds_generic_x86_with_onnxruntime_cpu():
    facts = probe("/")
    assert facts.platform == "generic"
    assert facts.cpu_count >= 1
    ort = facts.runtimes["onnxruntime"]
    assert ort.available and "CPUExecutionProvider" in ort.providers
    # numpy 2: ai_edge_litert (tflite_runtime can't build an interpreter); numpy 1.x: tflite_runtime
    assert any(facts.runtimes[m].available for m in ("tflite_runtime", "ai_edge_litert"))
    assert choose_runtime(facts, "tflite").backend == "tflite"
    assert probe("/").runtimes == facts.runtimes  # cached: second probe re-uses the checks


# ---------------------------------------------------------------- choose_runtime: onnx


def test_cpu_only_onnxruntime_picks_cpu(x86):
    choice = choose_runtime(with_runtimes(x86, CPU_ORT), "onnx")
    assert choice == RuntimeChoice("onnxruntime", "onnxruntime", "cpu", ("CPUExecutionProvider",), choice.reason)
    assert choice.reason.startswith("onnx model → onnxruntime CPU")


def test_onnxruntime_with_tensorrt_picks_tensorrt_with_full_provider_chain(x86):
    choice = choose_runtime(with_runtimes(x86, GPU_ORT), "onnx")
    assert choice.accelerator == "tensorrt"
    assert choice.providers == ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")
    assert choice.reason == "onnx model → onnxruntime TensorRT (TensorrtExecutionProvider available)"


def test_onnxruntime_with_cuda_only_picks_cuda_then_cpu(x86):
    choice = choose_runtime(with_runtimes(x86, CUDA_ORT), "onnx")
    assert (choice.accelerator, choice.providers) == ("cuda", ("CUDAExecutionProvider", "CPUExecutionProvider"))


def test_pinned_cpu_on_gpu_onnxruntime_uses_only_cpu_provider(x86):
    choice = choose_runtime(with_runtimes(x86, GPU_ORT), "onnx", accelerator="cpu")
    assert (choice.accelerator, choice.providers) == ("cpu", ("CPUExecutionProvider",))


def test_pinned_cuda_without_provider_raises_with_install_hint(x86):
    with pytest.raises(RuntimeChoiceError) as err:
        choose_runtime(with_runtimes(x86, CPU_ORT), "onnx", accelerator="cuda")
    assert str(err.value) == (
        "accelerator 'cuda' requested but onnxruntime has no CUDAExecutionProvider "
        "(installed providers: CPUExecutionProvider); install onnxruntime-gpu or set runtime.accelerator: auto"
    )


def test_cpu_onnxruntime_on_jetson_says_gpu_is_unused(tmp_path):
    facts = with_runtimes(probe(fx.jetson_orin(tmp_path), check_runtimes=False), CPU_ORT)
    reason = choose_runtime(facts, "onnx").reason
    assert "/dev/nvgpu/igpu0" in reason and "onnxruntime-gpu" in reason


def test_onnx_model_cannot_be_pinned_to_tflite_or_edgetpu(x86):
    facts = with_runtimes(x86, LITERT, CPU_ORT)
    with pytest.raises(RuntimeChoiceError, match="cannot run .onnx"):
        choose_runtime(facts, "onnx", backend="tflite")
    with pytest.raises(RuntimeChoiceError, match="Edge TPU"):
        choose_runtime(facts, "onnx", accelerator="edgetpu")


# ---------------------------------------------------------------- choose_runtime: tflite


def test_tflite_skips_broken_tflite_runtime_and_picks_ai_edge_litert(x86):
    choice = choose_runtime(with_runtimes(x86, BROKEN_TFLITE_RUNTIME, LITERT, MISSING_TF), "tflite")
    assert (choice.backend, choice.module, choice.accelerator) == ("tflite", "ai_edge_litert", "xnnpack")
    assert choice.reason.startswith("tflite model → ai_edge_litert with XNNPACK (no Edge TPU found)")
    assert "tflite_runtime skipped: numpy ABI" in choice.reason


def test_tflite_prefers_tflite_runtime_when_it_works(x86):
    working = RuntimeAvailability("tflite_runtime", True, "2.14.0")
    assert choose_runtime(with_runtimes(x86, working, LITERT), "tflite").module == "tflite_runtime"


def test_tflite_without_working_module_raises_naming_modules_and_pip_extra(x86):
    with pytest.raises(RuntimeChoiceError) as err:
        choose_runtime(with_runtimes(x86, BROKEN_TFLITE_RUNTIME, MISSING_LITERT, MISSING_TF, CPU_ORT), "tflite")
    message = str(err.value)
    assert "tflite_runtime: numpy ABI" in message
    assert "No module named 'ai_edge_litert'" in message and "No module named 'tensorflow'" in message
    assert "pip install 'edge-agent[tflite]'" in message


def test_tflite_model_pinned_to_onnxruntime_raises(x86):
    with pytest.raises(RuntimeChoiceError, match=r"onnxruntime cannot run \.tflite files.*backend: auto"):
        choose_runtime(with_runtimes(x86, LITERT, CPU_ORT), "tflite", backend="onnxruntime")


def test_tflite_pinned_to_cuda_raises(x86):
    with pytest.raises(RuntimeChoiceError, match="'cuda' needs an .onnx model"):
        choose_runtime(with_runtimes(x86, LITERT, GPU_ORT), "tflite", accelerator="cuda")


@pytest.fixture
def coral(tmp_path) -> HardwareFacts:
    fx.libedgetpu(fx.coral_usb(fx.raspberry_pi_4(tmp_path)), "usr/lib/aarch64-linux-gnu")
    return with_runtimes(probe(tmp_path, check_runtimes=False), LITERT)


def test_edgetpu_chosen_when_device_present_and_model_compiled_for_it(coral):
    choice = choose_runtime(coral, "tflite", compiled_for="edgetpu")
    assert (choice.module, choice.accelerator) == ("ai_edge_litert", "edgetpu")
    assert "usb:18d1:9302" in choice.reason


def test_plain_model_on_edgetpu_machine_uses_xnnpack(coral):
    choice = choose_runtime(coral, "tflite", compiled_for=None)
    assert choice.accelerator == "xnnpack"
    assert "model not compiled for it" in choice.reason


def test_edgetpu_model_without_device_raises(x86):
    with pytest.raises(RuntimeChoiceError, match="no Edge TPU device found"):
        choose_runtime(with_runtimes(x86, LITERT), "tflite", compiled_for="edgetpu")


def test_pinned_edgetpu_with_plain_model_raises(coral):
    with pytest.raises(RuntimeChoiceError, match="not compiled for the Edge TPU"):
        choose_runtime(coral, "tflite", accelerator="edgetpu")


def test_is_edgetpu_model_looks_for_the_custom_op_name(tmp_path):
    compiled, plain = tmp_path / "m_edgetpu.tflite", tmp_path / "m.tflite"
    compiled.write_bytes(b"\x1c\x00\x00\x00TFL3" + b"\x00" * 64 + b"edgetpu-custom-op\x00" + b"\x00" * 16)
    plain.write_bytes(b"\x1c\x00\x00\x00TFL3" + b"\x00" * 64 + b"CONV_2D\x00")
    assert is_edgetpu_model(compiled)
    assert not is_edgetpu_model(plain)
    assert not is_edgetpu_model(tmp_path / "missing.tflite")


# ---------------------------------------------------------------- report


def test_report_lists_hardware_runtimes_and_choices(tmp_path):
    facts = with_runtimes(probe(fx.raspberry_pi_4(tmp_path), check_runtimes=False),
                          BROKEN_TFLITE_RUNTIME, LITERT, CPU_ORT)
    report = format_report(facts)
    assert "Raspberry Pi 4 Model B Rev 1.4" in report
    assert "cpu-thermal 48.3 °C" in report
    assert "0x50005 (under_voltage, throttled, under_voltage_occurred, throttled_occurred)" in report
    assert "tflite_runtime   unavailable (numpy ABI)" in report
    assert "tflite  tflite model → ai_edge_litert with XNNPACK" in report
    assert "onnx    onnx model → onnxruntime CPU" in report


def test_report_shows_choice_errors_instead_of_raising(tmp_path):
    facts = probe(fx.jetson_nano(tmp_path), check_runtimes=False)
    report = format_report(facts)
    assert "L4T:          32.7.1" in report
    assert "Runtimes:     not checked" in report
    assert "tflite  error: no working TFLite runtime" in report


def test_unknown_accelerator_is_rejected_with_the_allowed_values(x86):
    with pytest.raises(RuntimeChoiceError, match="unknown accelerator 'npu'; expected one of auto, cpu"):
        choose_runtime(with_runtimes(x86, LITERT, CPU_ORT), "tflite", accelerator="npu")


@pytest.mark.parametrize(("configured", "cores", "expected"),
                         [(0, 1, 1), (0, 2, 2), (0, 3, 3), (0, 4, 3), (0, 6, 5), (0, 8, 7), (2, 8, 2), (6, 2, 6)])
def test_threads_0_leaves_a_core_to_the_pipeline_only_on_4_cores_or_more(configured, cores, expected):
    assert inference_threads(configured, cores) == expected


def test_threads_0_counts_the_cores_this_process_may_use(tmp_path):
    # a cpuset (taskset, systemd CPUAffinity=) narrower than the machine decides, not /proc/cpuinfo
    script = "from agent.runtimes import inference_threads; print(inference_threads(0))"
    one = subprocess.run(["taskset", "-c", "0", sys.executable, "-c", script], capture_output=True, text=True,
                         cwd=REPO, check=True)
    assert one.stdout.strip() == "1"
    cores = len(os.sched_getaffinity(0))
    assert inference_threads(0) == (cores - 1 if cores >= 4 else cores)


def test_health_finds_the_pi_sensors_once_and_reads_them_every_sample(tmp_path):
    from types import SimpleNamespace

    from agent.camera import FrameSlot
    from agent.daemon.health import HealthSampler
    from agent.inference.pipeline import PipelineStats

    root = fx.raspberry_pi_4(tmp_path)
    sampler = HealthSampler(root=str(root))
    parts = dict(pipeline=SimpleNamespace(stats=PipelineStats()), slot=FrameSlot(),
                 capture=SimpleNamespace(captured=0, state="streaming", source=SimpleNamespace(name="synthetic"),
                                         reopens=0, last_error=None),
                 mqtt=SimpleNamespace(state="connected", sent=0, unsent=0, last_error=None, taken_over=0,
                                      refused=0, oversize=0),
                 model_info=SimpleNamespace(brief=lambda: {"name": "m", "version": "1"}))
    first = sampler.sample(**parts)
    assert first.throttled["raw"] == "0x50005" and first.temperature_c == {"cpu-thermal": 48.312}
    # the firmware clears the live bits and the SoC cools: the next sample says so
    (root / "sys/devices/platform/soc/soc:firmware/get_throttled").write_text("50000\n")
    (root / "sys/class/thermal/thermal_zone0/temp").write_text("45000\n")
    second = sampler.sample(**parts)
    assert second.throttled["raw"] == "0x50000" and not second.throttled["under_voltage"]
    assert second.temperature_c == {"cpu-thermal": 45.0}
