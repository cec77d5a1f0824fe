"""What the status topic (and the status and snapshot commands) say about this device."""

from __future__ import annotations

import base64
import time
from dataclasses import asdict, dataclass

import cv2
import numpy as np

from agent import __version__
from agent.camera import Frame
from agent.hardware.facts import HardwareFacts
from agent.inference.loaded import LoadedModel

SNAPSHOT_MAX_WIDTH = 640


@dataclass(frozen=True)
class PlatformInfo:
    kind: str  # raspberry-pi | jetson | generic
    model: str
    arch: str


@dataclass(frozen=True)
class RuntimeInfo:
    module: str
    providers: list[str]
    reason: str | None
    notes: list[str]
    spin: dict | None = None  # runtime.spin: policy, spinning now, why


@dataclass(frozen=True)
class Status:
    """The retained status payload (docs/mqtt.md); the last will says only ``{"state": "offline"}``."""

    state: str  # online | offline
    ts: float
    device_id: str
    groups: list[str]
    boot_id: str
    agent_version: str
    platform: PlatformInfo
    backend: str
    accelerator: str
    runtime: RuntimeInfo
    model: dict
    camera: dict

    def to_json(self) -> dict:
        return asdict(self)


def device_status(state: str, *, device_id: str, groups: list[str], boot_id: str, facts: HardwareFacts,
                  model: LoadedModel, camera_source: str, spin: dict | None = None) -> Status:
    info = model.session.info
    return Status(
        state=state, ts=time.time(), device_id=device_id, groups=list(groups), boot_id=boot_id,
        agent_version=__version__, platform=PlatformInfo(facts.platform, facts.model, facts.arch),
        backend=info.backend, accelerator=info.accelerator,
        runtime=RuntimeInfo(info.module, list(info.providers), model.choice.reason if model.choice else None,
                            list(info.notes), spin),
        model={**model.info.to_json(), "precision": precision(model)}, camera={"source": camera_source},
    )


def precision(model: LoadedModel) -> str:
    """int8 when the model's tensors are quantised, float16 when its input is, else float32."""
    specs = (*model.session.inputs, *model.session.outputs)
    if any(s.quantized for s in specs):
        return "int8"
    return "float16" if any(s.dtype == np.float16 for s in model.session.inputs) else "float32"


def _small(frame: Frame) -> tuple[bytes, int, int]:
    h, w = frame.image.shape[:2]
    scale = min(1.0, SNAPSHOT_MAX_WIDTH / w)
    img = cv2.resize(frame.image, (int(w * scale), int(h * scale))) if scale < 1 else frame.image
    ok, jpeg = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 80])
    if not ok:
        raise ValueError("could not encode the frame")
    return jpeg.tobytes(), img.shape[1], img.shape[0]


def snapshot_jpeg(frame: Frame) -> bytes:
    """The frame as a JPEG at most SNAPSHOT_MAX_WIDTH wide (Home Assistant's image entity)."""
    return _small(frame)[0]


def snapshot(frame: Frame | None) -> dict:
    """The newest frame as a small JPEG (base64): what the snapshot command answers."""
    if frame is None:
        raise ValueError("no frame captured yet")
    jpeg, w, h = _small(frame)
    return {"frame_ts": frame.ts, "width": w, "height": h, "jpeg": base64.b64encode(jpeg).decode()}
