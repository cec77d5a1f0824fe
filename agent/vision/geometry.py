"""How a frame was mapped onto the model input, so boxes can be mapped back."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Geometry:
    """Frame (src) to model input (dst) mapping: dst = src * scale + pad, per axis, in pixels.

    ``stretch`` resizing has pad 0 and different x/y scales; ``letterbox`` has one scale and
    a centred pad.
    """

    src_w: int
    src_h: int
    dst_w: int
    dst_h: int
    scale_x: float
    scale_y: float
    pad_x: float = 0.0
    pad_y: float = 0.0

    @classmethod
    def stretch(cls, src_w: int, src_h: int, dst_w: int, dst_h: int) -> Geometry:
        return cls(src_w, src_h, dst_w, dst_h, dst_w / src_w, dst_h / src_h)

    @classmethod
    def letterbox(cls, src_w: int, src_h: int, dst_w: int, dst_h: int) -> Geometry:
        s = min(dst_w / src_w, dst_h / src_h)
        new_w, new_h = round(src_w * s), round(src_h * s)
        return cls(src_w, src_h, dst_w, dst_h, s, s, (dst_w - new_w) // 2, (dst_h - new_h) // 2)

    def point_to_frame(self, x: float, y: float) -> tuple[float, float]:
        """Model-input coordinates normalised to [0,1] -> frame coordinates normalised to [0,1]."""
        fx = (x * self.dst_w - self.pad_x) / self.scale_x / self.src_w
        fy = (y * self.dst_h - self.pad_y) / self.scale_y / self.src_h
        return fx, fy

    def box_to_frame(self, x1: float, y1: float, x2: float, y2: float) -> tuple[float, float, float, float]:
        """A box normalised to the model input -> normalised to the frame, clipped to [0, 1]."""
        ax, ay = self.point_to_frame(x1, y1)
        bx, by = self.point_to_frame(x2, y2)
        return (_clip(ax), _clip(ay), _clip(bx), _clip(by))


def _clip(v: float) -> float:
    return 0.0 if v < 0.0 else 1.0 if v > 1.0 else float(v)
