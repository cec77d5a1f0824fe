"""What model.yaml and the deployment manifest say about feeding and decoding a model, in one schema.

``PreprocessSpec`` and ``DecodeSettings`` validate the ``preprocess`` and ``decode`` sections wherever
they appear (model.yaml beside a model, a deployment manifest), so a bad key is refused where it is
written, not later in the validation child. ``DecodeParams`` is what a task decoder receives.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class PreprocessSpec(BaseModel):
    """How a model wants its input; comes from model.yaml's ``preprocess`` section."""

    model_config = ConfigDict(extra="forbid")

    resize: Literal["stretch", "letterbox", "crop"] = "stretch"
    color: Literal["rgb", "bgr"] = "rgb"
    mean: tuple[float, float, float] = (0.0, 0.0, 0.0)
    std: tuple[float, float, float] = Field((255.0, 255.0, 255.0), description="float models: (x - mean) / std")
    layout: Literal["auto", "nhwc", "nchw"] = "auto"
    size: tuple[int, int] | None = Field(None, description="(height, width) for models with dynamic input size")
    pad_value: int = 114


class DecodeSettings(BaseModel):
    """How a task decoder reads the outputs; comes from the ``decode`` section."""

    model_config = ConfigDict(extra="forbid")

    threshold: float = Field(0.5, ge=0, le=1)
    iou_threshold: float = Field(0.45, ge=0, le=1)
    top_k: int = Field(5, ge=1)
    max_detections: int = Field(100, ge=1)
    yolo_layout: Literal["auto", "v5", "v8"] = "auto"

    def params(self, labels: tuple[str, ...]) -> DecodeParams:
        """These settings with the model's labels, as a decoder takes them."""
        return DecodeParams(labels=labels, threshold=self.threshold, top_k=self.top_k,
                            iou_threshold=self.iou_threshold, max_detections=self.max_detections,
                            yolo_layout=self.yolo_layout)


@dataclass(frozen=True)
class DecodeParams:
    """Settings shared by the decoders; each uses the fields that apply to its task."""

    labels: tuple[str, ...] = ()  # index -> name; a missing index is named str(index)
    threshold: float = 0.5  # minimum score
    top_k: int = 5  # classification: how many classes to report
    iou_threshold: float = 0.45  # detection NMS: suppress same-class boxes overlapping more than this
    max_detections: int = 100  # detection: most boxes kept per frame
    yolo_layout: str = "auto"  # auto | v5 | v8 (v8 also covers YOLO11)
