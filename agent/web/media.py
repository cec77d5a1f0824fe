"""Pictures for viewers: the newest frame as JPEG, with the newest prediction drawn on it, and MJPEG.

Nothing here runs per frame by itself: a picture is made when someone asks for one, so with no
viewer the agent does no extra work.
"""

from __future__ import annotations

import struct

import cv2
import numpy as np

from agent.camera import Frame
from agent.inference.pipeline import Prediction

JPEG_QUALITY = 80
MAX_WIDTH = 1280  # larger frames are scaled down for viewers
BOUNDARY = "edgeagentframe"
MAX_PIXELS = 40 * 10**6  # a posted image's size at most (8000x5000; 120 MB decoded)


def annotate(image: np.ndarray, pred: Prediction | None) -> np.ndarray:
    """A copy of ``image`` with ``pred``'s boxes, labels and scores (or its top class) drawn on it."""
    out = image.copy()
    if pred is None:
        return out
    h, w = out.shape[:2]
    thick = max(1, round(min(h, w) / 240))
    scale = max(0.4, min(h, w) / 800)
    banner = []
    for r in pred.results:
        if not hasattr(r, "score"):  # raw outputs: nothing to draw
            continue
        text = f"{r.label} {r.score:.2f}"
        box = getattr(r, "box", None)
        if box is None:
            banner.append(text)
            continue
        x1, y1, x2, y2 = (int(round(v * s)) for v, s in zip(box, (w, h, w, h), strict=True))
        cv2.rectangle(out, (x1, y1), (x2, y2), (0, 220, 0), thick)
        (tw, th), base = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, 1)
        ty = max(th + base, y1)
        cv2.rectangle(out, (x1, ty - th - base), (x1 + tw + 2, ty), (0, 220, 0), -1)
        cv2.putText(out, text, (x1 + 1, ty - base), cv2.FONT_HERSHEY_SIMPLEX, scale, (0, 0, 0), 1, cv2.LINE_AA)
    for i, text in enumerate(banner[:5]):
        y = int((i + 1) * 28 * scale + 6)
        cv2.putText(out, text, (8, y), cv2.FONT_HERSHEY_SIMPLEX, scale, (0, 0, 0), 3, cv2.LINE_AA)
        cv2.putText(out, text, (8, y), cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 255), 1, cv2.LINE_AA)
    return out


def jpeg(frame: Frame, pred: Prediction | None, annotated: bool, quality: int = JPEG_QUALITY) -> bytes:
    """The frame as JPEG bytes, scaled to at most MAX_WIDTH, with ``pred`` drawn on it when ``annotated``."""
    image = frame.image
    h, w = image.shape[:2]
    if w > MAX_WIDTH:
        image = cv2.resize(image, (MAX_WIDTH, round(h * MAX_WIDTH / w)), interpolation=cv2.INTER_AREA)
    if annotated:
        image = annotate(image, pred)
    ok, buf = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise ValueError("could not encode the frame as JPEG")
    return buf.tobytes()


def mjpeg_part(data: bytes) -> bytes:
    """One part of a multipart/x-mixed-replace stream."""
    return (f"--{BOUNDARY}\r\nContent-Type: image/jpeg\r\nContent-Length: {len(data)}\r\n\r\n".encode()
            + data + b"\r\n")


def image_size(data: bytes) -> tuple[int, int]:
    """(width, height) from a PNG's or JPEG's header, before anything is decoded; ValueError for other bytes.

    A small file can claim a huge picture (a PNG of zeros compresses 1000:1): the size is checked
    against MAX_PIXELS first, so a posted image cannot make the decoder take the device's memory.
    """
    if data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR" and len(data) >= 24:
        return struct.unpack(">II", data[16:24])
    if data[:2] == b"\xff\xd8":
        i = 2
        while i + 4 <= len(data):
            if data[i] != 0xFF:
                break
            marker = data[i + 1]
            if marker == 0xFF:  # a fill byte before the marker
                i += 1
                continue
            if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:  # no length
                i += 2
                continue
            (length,) = struct.unpack(">H", data[i + 2:i + 4])
            if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC) and i + 9 <= len(data):
                h, w = struct.unpack(">HH", data[i + 5:i + 9])
                return w, h
            i += 2 + length
        raise ValueError("the JPEG has no frame header")
    raise ValueError(f"the body ({len(data)} bytes) is not a JPEG or PNG")


def decode_image(data: bytes) -> np.ndarray:
    """A posted JPEG or PNG as a BGR image; ValueError when it is neither or too large."""
    if not data:
        raise ValueError("the request has no image (send a JPEG or PNG body, or a multipart file)")
    w, h = image_size(data)
    if w * h > MAX_PIXELS or not (w and h):
        raise ValueError(f"the image is {w}x{h}; at most {MAX_PIXELS // 10**6} megapixels are taken")
    try:
        image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    except cv2.error as exc:  # e.g. over OPENCV_IO_MAX_IMAGE_PIXELS (agent/__init__.py)
        raise ValueError(f"the image cannot be decoded ({str(exc).strip().splitlines()[-1][:160]})") from None
    if image is None:
        raise ValueError(f"the body ({len(data)} bytes) is not an image OpenCV can read (JPEG or PNG)")
    return image
