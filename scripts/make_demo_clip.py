#!/usr/bin/env python3
"""Make assets/demo.mp4: the clip `camera.source: auto` plays when no camera is attached.

    pip install 'edge-agent[assets]' && python scripts/make_demo_clip.py

Built from scikit-image's bundled photos: the astronaut portrait (a face) drifting across a 640x480
frame, then the coffee cup (no face), so predictions on the demo show faces coming and going.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
W, H, FPS = 640, 480, 15


def photo(name: str) -> np.ndarray:
    try:
        import skimage
    except ImportError:
        sys.exit("error: scikit-image is not installed: pip install 'edge-agent[assets]'")
    img = cv2.imread(str(Path(skimage.__file__).parent / "data" / name), cv2.IMREAD_COLOR)
    if img is None:
        sys.exit(f"error: scikit-image's data/{name} is missing or unreadable")
    return img


def frames() -> list[np.ndarray]:
    face = cv2.resize(photo("astronaut.png"), (400, 400), interpolation=cv2.INTER_AREA)
    cup = cv2.resize(photo("coffee.png"), (W, H), interpolation=cv2.INTER_AREA)
    out = []
    for i in range(3 * FPS):  # the portrait drifts left to right over 3 s
        canvas = np.full((H, W, 3), 90, np.uint8)
        x = int(i * (W - 400) / (3 * FPS - 1))
        canvas[40:440, x:x + 400] = face
        out.append(canvas)
    out.extend(cup.copy() for _ in range(1 * FPS))  # then 1 s with no face
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "assets" / "demo.mp4")
    args = parser.parse_args()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    writer = cv2.VideoWriter(str(args.out), cv2.VideoWriter_fourcc(*"mp4v"), FPS, (W, H))
    if not writer.isOpened():
        sys.exit("error: OpenCV cannot write mp4v video here (opencv-python-headless ships the codec)")
    clip = frames()
    for f in clip:
        writer.write(f)
    writer.release()
    print(f"{args.out}: {len(clip)} frames, {W}x{H} at {FPS} fps, {args.out.stat().st_size} bytes")


if __name__ == "__main__":
    main()
