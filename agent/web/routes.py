"""The HTTP routes: the page, pictures, the JSON API (the MQTT payloads), predict, Open Inference Protocol, metrics.

Handlers run on the server's loop; anything that blocks (JPEG encoding, a request on the frame
loop, a command on the deployer) goes to a worker thread (asyncio.to_thread).
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import time
from dataclasses import replace
from importlib import resources

from aiohttp import BodyPartReader, web

from agent.web import media, oip
from agent.web.backend import Counters, WebBackend
from agent.web.connections import Connections
from agent.web.metrics import CONTENT_TYPE, Metrics

log = logging.getLogger(__name__)
MAX_IMAGE_BYTES = 20 * 2**20
REQUEST_TIMEOUT_S = 15.0
STREAM_SNDBUF = 128 * 1024
STALLED_VIEWER_S = 5.0
MIN_STREAM_FPS = 0.2  # a viewer that takes no frame for this long is dropped
STATIC = ("index.html", "app.js", "app.css", "favicon.svg")
STATIC_TYPES = {"html": "text/html", "js": "text/javascript", "css": "text/css", "svg": "image/svg+xml"}


def error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


class Routes:
    binary_posts = ("/api/v1/predict",)
    max_body = MAX_IMAGE_BYTES + 2**16

    def __init__(self, backend: WebBackend, *, max_viewers: int, stream_fps: float, conns: Connections):
        self.backend = backend
        self.conns = conns
        self.max_viewers = max_viewers
        self.stream_fps = stream_fps
        self.viewers = 0
        self.closing = False
        self.metrics = Metrics(self._counters)
        self._static = {name: resources.files("agent.web").joinpath("static", name).read_bytes() for name in STATIC}

    def _counters(self) -> Counters:
        c = self.conns
        return replace(self.backend.counters(), viewers=self.viewers, http_connections=c.open,
                       http_refused=c.refused, http_timed_out=c.timed_out)

    def add_to(self, app: web.Application) -> None:
        gets = {"/": self.page, "/favicon.ico": self.favicon, "/latest.jpg": self.latest_jpg,
                "/stream.mjpeg": self.stream, "/api/v1/status": self.status, "/api/v1/health": self.health,
                "/api/v1/health/history": self.history, "/api/v1/latest": self.latest,
                "/api/v1/models": self.models, "/api/v1/deployments": self.deployments, "/metrics": self.prometheus,
                **{f"/static/{name}": self.static for name in STATIC[1:]}}
        posts = {"/api/v1/rollback": self.rollback, "/api/v1/reload": self.reload, "/api/v1/predict": self.predict}
        for path, handler in gets.items():
            app.router.add_get(path, handler)
        for path, handler in posts.items():
            app.router.add_post(path, handler)
        oip.add_routes(app, self.backend)

    # -- the page ---------------------------------------------------------------------------------
    async def page(self, request: web.Request) -> web.Response:
        return web.Response(body=self._static["index.html"], content_type="text/html", charset="utf-8",
                            headers={"Cache-Control": "no-store", "Content-Security-Policy": "default-src 'self'; "
                                     "img-src 'self' blob:; style-src 'self'; script-src 'self'"})

    async def static(self, request: web.Request) -> web.Response:
        name = request.path.rsplit("/", 1)[1]
        return web.Response(body=self._static[name], content_type=STATIC_TYPES[name.rsplit(".", 1)[1]],
                            charset="utf-8", headers={"Cache-Control": "no-cache"})

    async def favicon(self, request: web.Request) -> web.Response:
        return web.Response(body=self._static["favicon.svg"], content_type="image/svg+xml")

    # -- pictures ---------------------------------------------------------------------------------
    async def latest_jpg(self, request: web.Request) -> web.Response:
        frame, pred = self.backend.latest()
        if frame is None:
            return error(503, "no frame captured yet")
        annotated = request.query.get("annotated", "0") not in ("0", "false", "")
        data = await asyncio.to_thread(media.jpeg, frame, pred, annotated)
        return web.Response(body=data, content_type="image/jpeg", headers={"Cache-Control": "no-store"})

    async def stream(self, request: web.Request) -> web.StreamResponse:
        if self.viewers >= self.max_viewers:
            return error(503, f"{self.viewers} viewers already (http.max_viewers: {self.max_viewers})")
        try:
            fps = min(float(request.query.get("fps", self.stream_fps)), self.stream_fps)
        except ValueError:
            return error(400, "fps must be a number")
        if not fps >= MIN_STREAM_FPS:
            return error(400, f"fps must be at least {MIN_STREAM_FPS}")
        annotated = request.query.get("annotated", "1") not in ("0", "false", "")
        resp = web.StreamResponse(headers={
            "Content-Type": f"multipart/x-mixed-replace; boundary={media.BOUNDARY}",
            "Cache-Control": "no-store", "Connection": "close"})
        self.viewers += 1
        sock = request.transport.get_extra_info("socket") if request.transport else None
        if sock is not None:  # a viewer that stops reading blocks our writes within a few frames, not megabytes
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, STREAM_SNDBUF)
        try:
            await resp.prepare(request)
            last_ts = None
            period = 1.0 / fps
            while not self.closing:
                t0 = time.monotonic()
                frame, pred = self.backend.latest()
                if frame is not None and frame.ts != last_ts:
                    last_ts = frame.ts
                    data = await asyncio.to_thread(media.jpeg, frame, pred, annotated)
                    # A viewer that stops reading fills its socket buffer; drain() then waits, and a
                    # stalled one is dropped after a few seconds instead of holding a viewer slot forever.
                    await asyncio.wait_for(resp.write(media.mjpeg_part(data)), timeout=STALLED_VIEWER_S)
                # in short naps: aiohttp does not cancel a handler whose client left, so look
                while (left := period - (time.monotonic() - t0)) > 0 and not _gone(request):
                    await asyncio.sleep(min(left, 0.25))
                if _gone(request):
                    break
        except (TimeoutError, ConnectionError, asyncio.CancelledError):
            pass
        finally:
            self.viewers -= 1
        return resp

    # -- the JSON API -----------------------------------------------------------------------------
    async def status(self, request: web.Request) -> web.Response:
        return web.json_response(self.backend.status())

    async def health(self, request: web.Request) -> web.Response:
        health = self.backend.health()
        if health is None:
            return error(503, "no health sample yet (the first comes within health.interval_s)")
        return web.json_response(health)

    async def history(self, request: web.Request) -> web.Response:
        return web.json_response({"samples": self.backend.health_history()})

    async def latest(self, request: web.Request) -> web.Response:
        _, pred = self.backend.latest()
        if pred is None:
            return error(503, "no prediction yet")
        return web.json_response(pred.to_json())

    async def _command(self, name: str, args: dict) -> web.Response:
        reply = await asyncio.to_thread(self.backend.command, name, args, REQUEST_TIMEOUT_S)
        return web.json_response({"ok": reply.ok, "error": reply.error, **reply.result},
                                 status=200 if reply.ok else 409)

    async def models(self, request: web.Request) -> web.Response:
        return await self._from_models_reply("models")

    async def deployments(self, request: web.Request) -> web.Response:
        return await self._from_models_reply("deployments")

    async def _from_models_reply(self, key: str) -> web.Response:
        """One part of what the ``models`` command answers (models, or the journal's deployments)."""
        reply = await asyncio.to_thread(self.backend.command, "models", {}, REQUEST_TIMEOUT_S)
        if not reply.ok:
            return error(503, reply.error or "no answer")
        return web.json_response({key: reply.result.get(key, [])})

    async def rollback(self, request: web.Request) -> web.Response:
        try:
            body = json.loads(await request.read() or b"{}") if request.can_read_body else {}
        except (ValueError, RecursionError):
            return error(400, "the body is not JSON")
        if not isinstance(body, dict):
            return error(400, "the body must be a JSON object")
        args = {"to": body["to"]} if body.get("to") is not None else {}
        return await self._command("rollback", args)

    async def reload(self, request: web.Request) -> web.Response:
        return await self._command("reload", {})

    async def predict(self, request: web.Request) -> web.Response:
        try:
            data = await _image_bytes(request)
            image = await asyncio.to_thread(media.decode_image, data)  # decoding is not the loop's work
        except ValueError as exc:
            return error(400, str(exc))
        except web.HTTPRequestEntityTooLarge:
            return error(413, f"the image is over {MAX_IMAGE_BYTES // 2**20} MB")
        try:
            result = await asyncio.to_thread(self.backend.predict, image, REQUEST_TIMEOUT_S)
        except TimeoutError as exc:
            return error(503, str(exc))
        except Exception as exc:  # noqa: BLE001 - the model failed on this image: say so, one line
            return error(422, f"the model failed on this image: {type(exc).__name__}: {exc}")
        return web.json_response(result)

    async def prometheus(self, request: web.Request) -> web.Response:
        body = await asyncio.to_thread(self.metrics.render)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})


def _gone(request: web.Request) -> bool:
    transport = request.transport
    return transport is None or transport.is_closing()


async def _image_bytes(request: web.Request) -> bytes:
    """The posted image: the body itself, or the first file part of a multipart form."""
    if request.content_type.startswith("multipart/"):
        reader = await request.multipart()
        async for part in reader:
            if not isinstance(part, BodyPartReader):  # a multipart inside the multipart: not an image
                continue
            if part.filename or part.headers.get("Content-Type", "").startswith("image/"):
                return bytes(await part.read(decode=False))
        raise ValueError("the multipart form has no file part")
    return await request.read()

