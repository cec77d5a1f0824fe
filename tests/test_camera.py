"""Frame sources and the capture thread: newest frame wins, fps cap, reopen after a stall."""

from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import REPO, wait_until

from agent.camera import (
    DEMO_CLIP,
    Capture,
    CvSource,
    Frame,
    FrameSlot,
    ImageFolderSource,
    SourceError,
    SyntheticSource,
    make_source,
)
from agent.config import CameraConfig
from agent.support.redact import redact_url as _redact


def frame(i: int) -> Frame:
    return Frame(np.zeros((2, 2, 3), np.uint8), time.time(), time.monotonic(), i)


def test_slot_keeps_only_the_newest_frame_and_counts_the_dropped():
    slot = FrameSlot()
    for i in range(5):
        slot.put(frame(i))
    assert slot.take(0.1).index == 4
    assert slot.dropped == 4
    assert slot.take(0.05) is None


def test_auto_without_a_camera_plays_the_bundled_demo_clip(monkeypatch):
    monkeypatch.setattr("agent.camera.first_video_device", lambda dev_root="/dev": None)
    src = make_source(CameraConfig(source="auto"))
    assert isinstance(src, CvSource) and src.target == str(DEMO_CLIP) and src.loop
    src.open()
    img = src.read()
    src.close()
    assert img is not None and img.shape == (480, 640, 3)


def test_source_strings_pick_the_right_kind(tmp_path: Path):
    assert isinstance(make_source(CameraConfig(source="synthetic")), SyntheticSource)
    assert isinstance(make_source(CameraConfig(source=f"images:{tmp_path}")), ImageFolderSource)
    dev = make_source(CameraConfig(source="/dev/video3"))
    assert isinstance(dev, CvSource) and dev.live and dev.target == "/dev/video3"
    idx = make_source(CameraConfig(source="2"))
    assert isinstance(idx, CvSource) and idx.target == 2 and idx.live
    rtsp = make_source(CameraConfig(source="rtsp://admin:hunter2@10.0.0.5/stream1"))
    assert rtsp.live and "hunter2" not in rtsp.name
    gst = make_source(CameraConfig(source="gst:nvarguscamerasrc ! nvvidconv ! appsink"))
    assert gst.live and gst.target == "nvarguscamerasrc ! nvvidconv ! appsink"
    f = make_source(CameraConfig(source=str(DEMO_CLIP), loop=False))
    assert not f.live and not f.loop


def test_rtsp_credentials_never_reach_names_or_logs():
    assert _redact("rtsp://admin:hunter2@cam/s") == "rtsp://admin:***@cam/s"
    assert _redact("rtsp://cam/s") == "rtsp://cam/s"


@pytest.mark.parametrize("url, shown", [
    ("rtsp://admin:p@ss@cam/stream", "rtsp://admin:***@cam/stream"),  # '@' inside the password
    ("rtsp://admin:a/b@cam:554/live", "rtsp://admin:***@cam:554/live"),  # '/' inside the password
    ("rtsp://TOKEN123@cam/live", "rtsp://***@cam/live"),  # a user alone may be a token
    ("http://cam/video.cgi?user=admin&pwd=s3cret&res=640", "http://cam/video.cgi?user=***&pwd=***&res=640"),
    ("http://cam/snap?access_token=abc&fps=5", "http://cam/snap?access_token=***&fps=5"),
    ("http://cam/mjpg?resolution=640&fps=5", "http://cam/mjpg?resolution=640&fps=5"),
])
def test_no_part_of_a_credential_reaches_names_or_logs(url, shown):
    assert _redact(url) == shown


def test_video_file_loops_when_asked():
    src = CvSource(str(DEMO_CLIP), live=False, loop=True)
    src.open()
    n = sum(1 for _ in range(70) if src.read() is not None)  # the clip has 60 frames
    src.close()
    assert n == 70


def test_missing_image_folder_is_a_clear_error(tmp_path: Path):
    with pytest.raises(SourceError, match="image folder not found"):
        ImageFolderSource(str(tmp_path / "nope")).open()
    (tmp_path / "empty").mkdir()
    with pytest.raises(SourceError, match="no images"):
        ImageFolderSource(str(tmp_path / "empty")).open()


def test_fps_cap_paces_a_file_source():
    slot = FrameSlot()
    cap = Capture(SyntheticSource(64, 48), slot, fps=20, stall_s=5)
    cap.start()
    time.sleep(1.5)
    cap.stop()
    assert 24 <= cap.captured <= 34, cap.captured  # 20 fps for 1.5 s, with start-up slack


def test_a_source_that_vanishes_is_reopened_with_backoff_and_the_state_shows_it(tmp_path: Path):
    folder = tmp_path / "cam"
    folder.mkdir()
    cv2.imwrite(str(folder / "a.png"), np.zeros((48, 64, 3), np.uint8))
    slot = FrameSlot()
    cap = Capture(ImageFolderSource(str(folder)), slot, fps=20, stall_s=0.5)
    cap.start()
    try:
        wait_until(lambda: cap.state == "streaming", 5, what="streaming")
        shutil.rmtree(folder)  # the camera is unplugged
        wait_until(lambda: cap.state in ("stalled", "reconnecting"), 5, what="the stall to be noticed")
        assert cap.reopens >= 1
        wait_until(lambda: cap.last_error and "not found" in cap.last_error, 5, what="the open error")
        before = cap.captured
        folder.mkdir()
        cv2.imwrite(str(folder / "a.png"), np.zeros((48, 64, 3), np.uint8))  # plugged back in
        wait_until(lambda: cap.state == "streaming" and cap.captured > before, 15, what="streaming again")
    finally:
        cap.stop()


def test_a_non_looping_file_ends_and_says_so_and_an_uncapped_file_drops_nothing():
    slot = FrameSlot()
    cap = Capture(CvSource(str(REPO / "assets" / "demo.mp4"), live=False, loop=False), slot, fps=0, stall_s=5)
    taken = []
    stop = threading.Event()

    def consumer():  # a slow consumer: an uncapped file waits for it instead of dropping frames
        while not stop.is_set():
            f = slot.take(0.1)
            if f is not None:
                taken.append(f.index)
                time.sleep(0.005)

    t = threading.Thread(target=consumer, daemon=True)
    t.start()
    cap.start()
    try:
        wait_until(lambda: cap.state == "ended", 20, what="the end of the clip")
        wait_until(lambda: len(taken) == 60, 5, what="every frame consumed")
        assert cap.captured == 60 and slot.dropped == 0 and taken == list(range(60))
    finally:
        stop.set()
        cap.stop()
