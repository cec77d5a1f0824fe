"""The plain result types every task decoder returns."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class Classification:
    label: str
    score: float
    index: int

    def to_json(self) -> dict:
        return {"label": self.label, "score": round(self.score, 4), "index": self.index}


@dataclass(frozen=True, slots=True)
class Detection:
    """A box normalised to the original frame: x1, y1, x2, y2 in [0, 1]."""

    label: str
    score: float
    box: tuple[float, float, float, float]
    index: int = 0
    keypoints: tuple[tuple[float, float], ...] = field(default=())

    def to_json(self) -> dict:
        out: dict = {
            "label": self.label,
            "score": round(self.score, 4),
            "box": [round(v, 4) for v in self.box],
            "index": self.index,
        }
        if self.keypoints:
            out["keypoints"] = [[round(x, 4), round(y, 4)] for x, y in self.keypoints]
        return out


@dataclass(frozen=True, slots=True)
class RawTensor:
    """Shape and summary of one output, for models without a known task."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    min: float
    max: float
    mean: float
    argmax: int

    def to_json(self) -> dict:
        return {
            "name": self.name,
            "shape": list(self.shape),
            "dtype": self.dtype,
            "min": round(self.min, 6),
            "max": round(self.max, 6),
            "mean": round(self.mean, 6),
            "argmax": self.argmax,
        }


Result = Classification | Detection | RawTensor
