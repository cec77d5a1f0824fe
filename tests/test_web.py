"""The HTTP server in the daemon: the JSON API, pictures, predict, the Open Inference Protocol, metrics, who may ask."""

from __future__ import annotations

import http.client
import json
import socket
import struct
import subprocess
import sys
import time
import urllib.error
import urllib.request
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import ASTRONAUT_FACE, MODELS, REPO, agent_config, astronaut, choose, wait_until
from prometheus_client.parser import text_string_to_metric_families

from agent.ctl.bench.broker import free_port
from agent.inference.loader import load_model

TOKEN = "s3cret-token-for-the-tests-0123456789"


def iou(a, b) -> float:
    x1, y1, x2, y2 = max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3])
    inter = max(0.0, x2 - x1) * max(0.0, y2 - y1)
    area = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / area if area > 0 else 0.0


def get(url: str, token: str | None = None, timeout: float = 10, method: str = "GET",
        **headers) -> tuple[int, dict, bytes]:
    req = urllib.request.Request(url, method=method,
                                 headers={**({"Authorization": f"Bearer {token}"} if token else {}), **headers})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def post(url: str, body: bytes, content_type: str, token: str | None = None) -> tuple[int, dict]:
    req = urllib.request.Request(url, data=body, method="POST", headers={
        "Content-Type": content_type, **({"Authorization": f"Bearer {token}"} if token else {})})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def start_web_agent(broker, agent_factory, tmp_path: Path, frames: Path | None = None, **overrides):
    port = free_port()
    http = {"listen": f"127.0.0.1:{port}", **overrides.pop("http", {})}
    camera = {"source": f"images:{frames}", "fps": 15} if frames else {"source": "synthetic", "fps": 15}
    cfg = agent_config(broker, tmp_path, http=http, camera=camera, **overrides)
    agent = agent_factory(cfg).start()
    base = f"http://127.0.0.1:{port}"
    wait_until(lambda: _answers(base), 60, what="the HTTP server")
    return cfg, agent, base


def _answers(base: str) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", int(base.rsplit(":", 1)[1])), timeout=0.5):
            return True
    except OSError:
        return False


@pytest.fixture
def web(broker, agent_factory, tmp_path, face_frames):
    frames, face = face_frames
    cfg, agent, base = start_web_agent(broker, agent_factory, tmp_path, frames)
    wait_until(lambda: get(base + "/api/v1/latest")[0] == 200, 30, what="a first prediction")
    return cfg, agent, base, face


def test_the_json_api_serves_the_mqtt_payloads(web):
    cfg, agent, base, face = web
    status, _, body = get(base + "/api/v1/status")
    s = json.loads(body)
    assert status == 200 and s["device_id"] == cfg["device_id"] and s["state"] == "online"
    assert s["model"]["name"] == "blazeface-short-range" and s["model"]["precision"] == "float32"
    wait_until(lambda: get(base + "/api/v1/health")[0] == 200, 10, what="a health sample")
    h = json.loads(get(base + "/api/v1/health")[2])
    assert h["frames_processed"] > 0 and "p95" in h["latency_ms"]["inference"]
    models = json.loads(get(base + "/api/v1/models")[2])["models"]
    assert models[0]["active"] and models[0]["name"] == "blazeface-short-range"
    assert json.loads(get(base + "/api/v1/deployments")[2]) == {"deployments": []}
    latest = json.loads(get(base + "/api/v1/latest")[2])
    assert latest["results"] and iou(latest["results"][0]["box"], face) > 0.6


def test_latest_jpg_is_the_frame_and_annotated_draws_the_face_box(web):
    cfg, agent, base, face = web
    status, headers, raw = get(base + "/latest.jpg")
    assert status == 200 and headers["Content-Type"] == "image/jpeg"
    plain = cv2.imdecode(np.frombuffer(raw, np.uint8), cv2.IMREAD_COLOR)
    assert plain.shape == (480, 640, 3)
    annotated = cv2.imdecode(np.frombuffer(get(base + "/latest.jpg?annotated=1")[2], np.uint8), cv2.IMREAD_COLOR)
    # what was drawn spans the face box's width and ends at its bottom edge (the label sits above it)
    x1, x2, y2 = face[0] * 640, face[2] * 640, face[3] * 480
    diff = np.abs(annotated.astype(int) - plain.astype(int)).sum(axis=2)
    changed = np.argwhere(diff > 120)
    assert len(changed) > 200, "nothing drawn"
    ys, xs = changed[:, 0], changed[:, 1]
    assert abs(np.percentile(xs, 2) - x1) < 25 and abs(np.percentile(xs, 98) - x2) < 25
    assert ys.max() < y2 + 25


def read_mjpeg(base: str, parts: int, query: str = "") -> list[np.ndarray]:
    conn = http.client.HTTPConnection("127.0.0.1", int(base.rsplit(":", 1)[1]), timeout=15)
    conn.request("GET", "/stream.mjpeg" + query)
    r = conn.getresponse()
    assert r.status == 200 and r.getheader("Content-Type").startswith("multipart/x-mixed-replace; boundary=")
    boundary = r.getheader("Content-Type").split("boundary=")[1].encode()
    images = []
    while len(images) < parts:
        line = r.fp.readline()
        if line.strip() != b"--" + boundary:
            continue
        headers = {}
        while (h := r.fp.readline().strip()):
            k, v = h.decode().split(":", 1)
            headers[k.lower()] = v.strip()
        assert headers["content-type"] == "image/jpeg"
        data = r.fp.read(int(headers["content-length"]))
        images.append(cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR))
    conn.close()
    return images


def test_the_mjpeg_stream_sends_decodable_frames_at_its_cap(broker, agent_factory, tmp_path):
    cfg, agent, base = start_web_agent(broker, agent_factory, tmp_path, http={"stream_fps": 5})
    wait_until(lambda: get(base + "/api/v1/latest")[0] == 200, 30, what="a first prediction")
    t0 = time.monotonic()
    images = read_mjpeg(base, 6)
    took = time.monotonic() - t0
    assert all(img is not None and img.shape == (480, 640, 3) for img in images)
    assert took > 0.8, f"6 frames in {took:.2f} s: over the 5 fps cap"
    assert not all(np.array_equal(images[0], img) for img in images[1:]), "the synthetic pattern moves"


def test_viewers_are_bounded_and_one_that_stops_reading_holds_nothing_else_up(broker, agent_factory, tmp_path):
    cfg, agent, base = start_web_agent(broker, agent_factory, tmp_path, http={"max_viewers": 2})
    wait_until(lambda: get(base + "/api/v1/latest")[0] == 200, 30, what="a first prediction")
    port = int(base.rsplit(":", 1)[1])
    stalled = []
    for _ in range(2):  # open, never read: their socket buffers fill
        s = socket.create_connection(("127.0.0.1", port))
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.sendall(b"GET /stream.mjpeg HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        stalled.append(s)
    wait_until(lambda: _metric(base, "edge_agent_stream_viewers") == 2, 10, what="two viewers")
    status, _, body = get(base + "/stream.mjpeg")
    assert status == 503 and b"http.max_viewers: 2" in body
    seq0 = json.loads(get(base + "/api/v1/latest")[2])["seq"]
    t0 = time.monotonic()
    assert get(base + "/api/v1/status")[0] == 200 and time.monotonic() - t0 < 2
    wait_until(lambda: json.loads(get(base + "/api/v1/latest")[2])["seq"] > seq0 + 10, 10, what="frames going on")
    # the stalled ones are dropped after their write times out; then a new viewer is let in
    wait_until(lambda: _metric(base, "edge_agent_stream_viewers") == 0, 30, what="the stalled viewers dropped")
    assert len(read_mjpeg(base, 1)) == 1
    for s in stalled:
        s.close()


def _metric(base: str, name: str) -> float | None:
    for family in text_string_to_metric_families(get(base + "/metrics")[2].decode()):
        for sample in family.samples:
            if sample.name == name:
                return sample.value
    return None


def test_metrics_parse_as_prometheus_and_follow_the_agents_counters(web):
    cfg, agent, base, face = web
    status, headers, body = get(base + "/metrics")
    assert status == 200 and headers["Content-Type"].startswith("text/plain; version=0.0.4")
    families = {f.name: f for f in text_string_to_metric_families(body.decode())}
    assert all(name.startswith("edge_agent_") for name in families)
    for counter in ("frames_captured", "frames_processed", "frames_dropped", "predictions_sent", "predictions_unsent",
                    "outbox_dropped", "deployments", "cpu_seconds"):
        assert families[f"edge_agent_{counter}"].type == "counter", counter
    hist = families["edge_agent_inference_duration_seconds"]
    assert hist.type == "histogram"
    samples = {(s.name, s.labels.get("le")): s.value for s in hist.samples}
    count = samples[("edge_agent_inference_duration_seconds_count", None)]
    processed = families["edge_agent_frames_processed"].samples[0].value
    assert count > 0 and abs(count - processed) <= 5  # read a moment apart
    buckets = [v for (n, le), v in samples.items() if n.endswith("_bucket")]
    assert buckets == sorted(buckets) and samples[("edge_agent_inference_duration_seconds_bucket", "+Inf")] == count
    mean_s = samples[("edge_agent_inference_duration_seconds_sum", None)] / count
    assert 0.0001 < mean_s < 0.5  # seconds, not milliseconds
    info = families["edge_agent_model_info"].samples[0]
    assert info.name == "edge_agent_model_info" and info.value == 1
    assert info.labels["name"] == "blazeface-short-range" and info.labels["backend"] == "tflite"
    assert len(info.labels["sha256"]) == 64
    assert {s.labels["result"] for s in families["edge_agent_deployments"].samples} == \
        {"committed", "failed", "rejected", "rolled_back"}
    assert families["edge_agent_resident_memory_bytes"].samples[0].value > 20 * 2**20
    wait_until(lambda: _metric(base, "edge_agent_frames_processed_total") > processed + 3, 10, what="counters going up")


def png_bomb(width: int, height: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    rows = zlib.compress(b"\0" * (width + 1) * 64)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", rows) + chunk(b"IEND", b""))


def encode(img: np.ndarray, ext: str) -> bytes:
    ok, buf = cv2.imencode(ext, img)
    assert ok
    return buf.tobytes()


def test_predict_finds_the_face_in_a_posted_photo_without_touching_the_streams_seq(broker, agent_factory, tmp_path,
                                                                                 recorder_factory):
    cfg, agent, base = start_web_agent(broker, agent_factory, tmp_path)  # the live stream: synthetic, no face
    rec = recorder_factory(broker, f"edge/{cfg['device_id']}/predictions")
    rec.wait_json("/predictions", count=3)
    photo = astronaut()
    x1, y1, x2, y2 = ASTRONAUT_FACE
    face = (x1 / 512, y1 / 512, x2 / 512, y2 / 512)
    boundary = "XyZboundary"
    multipart = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"a.png\"\r\n"
                 f"Content-Type: image/png\r\n\r\n").encode() + encode(photo, ".png") + f"\r\n--{boundary}--\r\n".encode()
    for body, ctype in ((encode(photo, ".jpg"), "image/jpeg"), (encode(photo, ".png"), "image/png"),
                        (multipart, f"multipart/form-data; boundary={boundary}")):
        status, reply = post(base + "/api/v1/predict", body, ctype)
        assert status == 200, reply
        assert reply["width"] == 512 and reply["model"]["name"] == "blazeface-short-range"
        assert len(reply["results"]) == 1 and iou(reply["results"][0]["box"], face) > 0.6, reply["results"]
    time.sleep(0.5)
    seqs = [p["seq"] for p in rec.json("/predictions")]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), "the stream's seq skipped or repeated"
    assert not any(p["results"] for p in rec.json("/predictions")), "a posted photo leaked into the live stream"


def test_bad_requests_get_one_line_errors(web):
    cfg, agent, base, face = web
    assert post(base + "/api/v1/predict", b"not an image", "image/jpeg") == \
        (400, {"error": "the body (12 bytes) is not a JPEG or PNG"})
    # 200 bytes on the wire that claim 30000x30000 pixels (2.7 GB decoded): refused before decoding
    assert post(base + "/api/v1/predict", png_bomb(30000, 30000), "image/png") == \
        (400, {"error": "the image is 30000x30000; at most 40 megapixels are taken"})
    truncated = encode(astronaut(), ".jpg")[:5000]
    assert post(base + "/api/v1/predict", truncated, "image/jpeg")[0] in (200, 400)  # a partial JPEG: decoded or refused, never a crash
    assert post(base + "/api/v1/predict", b"", "image/jpeg")[0] == 400
    assert post(base + "/api/v1/predict", b"x" * (21 * 2**20), "image/jpeg")[0] == 413
    assert post(base + "/api/v1/rollback", b"{}", "text/plain")[0] == 415  # a cross-site form cannot send JSON
    assert post(base + "/api/v1/rollback", b"[1", "application/json") == (400, {"error": "the body is not JSON"})
    status, reply = post(base + "/api/v1/rollback", b"{}", "application/json")
    assert status == 409 and reply["error"] == "no previous version to roll back to"
    for host in ("attacker.example:80", "127.evil.example", "127.0.0.1.attacker.com", "127.0.0.1:1@evil"):
        assert get(base + "/api/v1/status", Host=host)[0] == 403, host  # names DNS rebinding can point here
    assert get(base + "/api/v1/status", Host="[::1]:8080")[0] == 200
    status, headers, body = get(base + "/nope")
    assert (status, json.loads(body)) == (404, {"error": "Not Found"})
    assert get(base + "/api/v1/status", method="DELETE")[0] == 405
    deep = b"[" * 100000 + b"]" * 100000
    assert post(base + "/api/v1/rollback", deep, "application/json") == (400, {"error": "the body is not JSON"})
    nested = (b"--zz\r\nContent-Type: multipart/mixed; boundary=yy\r\n\r\n--yy\r\nContent-Type: image/png\r\n\r\n"
              b"abc\r\n--yy--\r\n\r\n--zz--\r\n")
    assert post(base + "/api/v1/predict", nested, "multipart/form-data; boundary=zz") == \
        (400, {"error": "the multipart form has no file part"})
    assert "Traceback" not in agent.log() and "Error handling request" not in agent.log()


def test_open_inference_protocol_runs_the_model_on_json_tensors(web):
    cfg, agent, base, face = web
    assert json.loads(get(base + "/v2/health/ready")[2]) == {"ready": True}
    meta = json.loads(get(base + "/v2/models/blazeface-short-range")[2])
    assert meta["versions"] == ["1.0.0"] and meta["platform"] == "tflite"
    (inp,) = meta["inputs"]
    assert inp["datatype"] == "FP32" and inp["shape"] == [1, 128, 128, 3]
    assert get(base + "/v2/models/other")[0] == 404
    rng = np.random.default_rng(3)
    tensor = rng.uniform(-1, 1, (1, 128, 128, 3)).astype(np.float32)
    status, reply = post(base + "/v2/models/blazeface-short-range/infer", json.dumps({
        "id": "r1", "inputs": [{"name": inp["name"], "shape": inp["shape"], "datatype": "FP32",
                                "data": tensor.reshape(-1).tolist()}]}).encode(), "application/json")
    assert status == 200 and reply["id"] == "r1" and reply["model_version"] == "1.0.0"
    model = load_model(MODELS / "blazeface.tflite", choose)
    want = model.session.run([tensor])
    assert [o["shape"] for o in reply["outputs"]] == [list(w.shape) for w in want]
    for got, w in zip(reply["outputs"], want, strict=True):
        np.testing.assert_allclose(np.array(got["data"], np.float32).reshape(w.shape), w, atol=1e-3)
    status, reply = post(base + "/v2/models/blazeface-short-range/infer", json.dumps({
        "inputs": [{"name": inp["name"], "shape": [1, 64, 64, 3], "datatype": "FP32", "data": [0] * 12288}]}).encode(),
        "application/json")
    assert status == 400 and "does not fit the model's [1, 128, 128, 3]" in reply["error"]

    def infer(data, datatype="FP32") -> tuple[int, dict]:
        return post(base + "/v2/models/blazeface-short-range/infer", json.dumps({"inputs": [
            {"name": inp["name"], "shape": [1, 128, 128, 3], "datatype": datatype, "data": data}]}).encode(),
            "application/json")

    assert infer([300] * 49152, "INT8")[0] == 400  # out of the type's range
    assert infer([0] * 49151 + [10**400])[0] == 400  # no float holds it
    assert infer([float("nan")] * 49152)[1] == \
        {"error": f"input {inp['name']!r}: data must be finite numbers (no NaN or infinity)"}
    status, reply = post(base + "/v2/models/blazeface-short-range/infer", b"[" * 100000 + b"]" * 100000,
                         "application/json")
    assert (status, reply) == (400, {"error": "the body is not JSON"})
    status, reply = post(base + "/v2/models/blazeface-short-range/infer", b"[]," * 600000, "application/json")
    assert status == 413 and "for this model's inputs" in reply["error"]


def test_a_token_guards_everything_and_the_browser_gets_a_cookie(broker, agent_factory, tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    cfg, agent, base = start_web_agent(broker, agent_factory, tmp_path, http={"token_file": str(token_file)})
    for path in ("/", "/api/v1/status", "/metrics", "/latest.jpg", "/stream.mjpeg", "/v2/health/ready"):
        status, headers, _ = get(base + path)
        assert status == 401 and headers["WWW-Authenticate"].startswith("Bearer"), path
        assert get(base + path, token="wrong-token-wrong-token")[0] == 401, path
    assert get(base + "/api/v1/status", token=TOKEN)[0] == 200
    assert get(base + "/api/v1/status", Authorization=f"bearer {TOKEN}")[0] == 200  # the scheme is case-insensitive
    port = int(base.rsplit(":", 1)[1])
    for header in (b"Authorization: Bearer \xff\xfe", b"Cookie: edge_agent_token=\xff\xfe"):
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            s.sendall(b"GET /api/v1/status HTTP/1.1\r\nHost: x\r\n" + header + b"\r\nConnection: close\r\n\r\n")
            assert s.recv(100).startswith(b"HTTP/1.1 401"), header
    assert get(base + "/api/v1/status", Host="cam-01.lan:8080", Authorization=f"Bearer {TOKEN}")[0] == 200
    status, headers, body = get(base + f"/?token={TOKEN}")
    assert status == 200 and b"<title>edge-agent</title>" in body
    cookie = headers["Set-Cookie"].split(";")[0]
    assert "HttpOnly" in headers["Set-Cookie"] and "SameSite=Strict" in headers["Set-Cookie"]
    assert get(base + "/api/v1/status", Cookie=cookie)[0] == 200
    assert "Traceback" not in agent.log()


def test_listening_off_loopback_without_a_token_refuses_to_start(broker, agent_factory, tmp_path):
    cfg = agent_config(broker, tmp_path, http={"listen": f"0.0.0.0:{free_port()}"})
    agent = agent_factory(cfg).start()
    assert agent.wait(30) == 2
    log = agent.log()
    assert "http.token_file" in log and "Traceback" not in log
    assert sum("http" in line for line in log.splitlines()[-3:]) >= 1


def test_a_short_or_unreadable_token_file_is_a_start_up_error(broker, agent_factory, tmp_path):
    short = tmp_path / "short"
    short.write_text("abc")
    for token_file, words in ((short, "at least 16 characters"), (tmp_path / "missing", "cannot read it")):
        cfg = agent_config(broker, tmp_path, http={"listen": f"0.0.0.0:{free_port()}", "token_file": str(token_file)})
        agent = agent_factory(cfg, name=f"agent-{token_file.name}").start()
        assert agent.wait(30) == 2
        assert words in agent.log() and "Traceback" not in agent.log()


def test_a_port_in_use_leaves_the_agent_running_without_the_server(broker, agent_factory, tmp_path,
                                                                   recorder_factory):
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    cfg = agent_config(broker, tmp_path, http={"listen": f"127.0.0.1:{port}"})
    rec = recorder_factory(broker, f"edge/{cfg['device_id']}/predictions")
    agent = agent_factory(cfg).start()
    rec.wait_json("/predictions", count=3, timeout=60)
    assert f"http.listen 127.0.0.1:{port}" in agent.log() and "the agent runs on" in agent.log()
    taken.close()


def test_a_viewer_that_asks_for_a_slow_stream_and_leaves_frees_its_slot(broker, agent_factory, tmp_path):
    cfg, agent, base = start_web_agent(broker, agent_factory, tmp_path, http={"max_viewers": 2})
    wait_until(lambda: get(base + "/api/v1/latest")[0] == 200, 30, what="a first prediction")
    assert get(base + "/stream.mjpeg?fps=1e-300")[0] == 400
    for _ in range(2):
        assert len(read_mjpeg(base, 1, "?fps=0.2")) == 1  # one frame, then gone for a 5 s wait
    wait_until(lambda: _metric(base, "edge_agent_stream_viewers") == 0, 3, what="the slots freed")
    assert len(read_mjpeg(base, 1)) == 1


def test_the_jpeg_header_parse_skips_fill_bytes_and_is_not_fooled_by_a_frame_header_in_a_comment():
    from agent.web.media import decode_image, image_size

    ok, buf = cv2.imencode(".jpg", np.zeros((16, 16, 3), np.uint8))
    real = bytearray(buf.tobytes())
    sof = real.index(b"\xff\xc0")
    real[sof + 5:sof + 9] = struct.pack(">HH", 12000, 12000)  # what the decoder would allocate: 144 MP
    fake = b"\xff\xc0\x00\x11\x08\x00\x10\x00\x10\x03\x01\x22\x00\x02\x11\x01\x03\x11\x01"
    comment = bytearray(0xFFFF - 2)
    at = 0xFE00 + 0xFF - 3  # where a parse that read the fill byte as a marker would land, in the comment
    comment[at:at + len(fake)] = fake
    data = b"\xff\xd8\xff\xff\xfe" + struct.pack(">H", 0xFFFF) + bytes(comment) + bytes(real[2:])
    assert image_size(data) == (12000, 12000)
    with pytest.raises(ValueError, match="the image is 12000x12000; at most 40 megapixels"):
        decode_image(data)


def test_connections_that_never_finish_their_request_cannot_take_the_agent_down(broker, tmp_path, recorder_factory):
    # A daemon with few file descriptors, as a small device's default may be; 300 half-requests from
    # anyone who can reach the port used to exhaust them and stop the whole agent (health sampling
    # failed with EMFILE). Now: at most 64 connections, and 5 s to send the headers.
    port = free_port()
    cfg = agent_config(broker, tmp_path, http={"listen": f"0.0.0.0:{port}", "token_file": str(tmp_path / "t")})
    (tmp_path / "t").write_text(TOKEN)
    config = tmp_path / "agent.yaml"
    config.write_text(json.dumps(cfg))
    rec = recorder_factory(broker, f"edge/{cfg['device_id']}/predictions")
    log = open(tmp_path / "agent.log", "wb")
    proc = subprocess.Popen(["bash", "-c", f"ulimit -n 256 && exec {sys.executable} -m agent.daemon --config {config}"],
                            cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    held: list[socket.socket] = []
    try:
        wait_until(lambda: _answers(f"http://127.0.0.1:{port}"), 60, what="the HTTP server")
        for _ in range(300):
            try:
                s = socket.create_connection(("127.0.0.1", port), timeout=2)
                s.sendall(b"GET / HTTP/1.1\r\n")
                held.append(s)
            except OSError:
                pass
        time.sleep(2)
        assert proc.poll() is None, (tmp_path / "agent.log").read_text()[-2000:]
        n = len(rec.json("/predictions"))
        wait_until(lambda: len(rec.json("/predictions")) > n + 10, 10, what="predictions while flooded")
        open_ones = 0
        for s in held:
            s.settimeout(0.01)
            try:
                open_ones += s.recv(1) == b"" and 0 or 1
            except TimeoutError:
                open_ones += 1
            except OSError:
                pass
        assert open_ones <= 64, f"{open_ones} half-requests still held"
        time.sleep(6)  # past the 5 s allowed for the headers: all closed, and the server answers again
        assert get(f"http://127.0.0.1:{port}/api/v1/status", token=TOKEN)[0] == 200
        status, _, body = get(f"http://127.0.0.1:{port}/metrics", token=TOKEN)
        metrics = {s.name: s.value for f in text_string_to_metric_families(body.decode()) for s in f.samples}
        assert metrics["edge_agent_http_connections_refused_total"] >= 300 - 64 - 5
        assert metrics["edge_agent_http_connections_timed_out_total"] >= 50
        text = (tmp_path / "agent.log").read_text()
        assert "main loop failed" not in text and "Traceback" not in text
    finally:
        for s in held:
            s.close()
        proc.terminate()
        assert proc.wait(15) == 0


def test_the_snapshot_command_answers_the_newest_frame_as_the_page_does(web, tmp_path):
    from deploy_helpers import ctl

    cfg, agent, base, face = web
    out = tmp_path / "snap.jpg"
    r = ctl(agent.config_path, "snapshot", "--out", str(out), "--timeout", "20")
    assert r.returncode == 0, r.stderr
    snap = cv2.imread(str(out))
    page = cv2.imdecode(np.frombuffer(get(base + "/latest.jpg")[2], np.uint8), cv2.IMREAD_COLOR)
    assert snap.shape == page.shape == (480, 640, 3)
    assert np.abs(snap.astype(int) - page.astype(int)).mean() < 8  # the same (still) frame, two JPEG encodings
