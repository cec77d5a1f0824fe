"""The HTTP server: aiohttp on its own thread and event loop, never on the frame loop.

Routes are in ``agent/web/routes.py``; this file owns the thread, the listening socket, TLS and who
may ask: with ``http.token_file`` every request needs the token (``Authorization: Bearer``, or the
cookie the page sets after ``/?token=…``); without one (loopback only) requests must name a loopback
host, so a web page elsewhere cannot reach the agent through DNS rebinding. Requests that change
something (POST other than predict/infer) must be JSON, which a cross-site form cannot send.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import ssl
import threading
from pathlib import Path

from aiohttp import web

from agent.config import HttpConfig, loopback_name
from agent.support.threads import name_this_thread
from agent.web.backend import WebBackend
from agent.web.connections import Connections
from agent.web.routes import Routes

log = logging.getLogger(__name__)
COOKIE = "edge_agent_token"
KEEPALIVE_S = 15.0  # an idle keep-alive connection is closed after this (aiohttp's default: an hour)
# Malformed requests from anyone who can reach the port would put a traceback each in the journal;
# errors in the agent's own handlers are caught and logged in one line by the guard instead.
logging.getLogger("aiohttp.server").setLevel(logging.CRITICAL)


def read_token(path: Path) -> str:
    """The Bearer token from ``http.token_file``; ValueError (exit 2) when it cannot be used."""
    try:
        token = path.read_text().strip()
    except OSError as exc:
        raise ValueError(f"http.token_file {path}: cannot read it ({exc.strerror})") from None
    if len(token) < 16:
        raise ValueError(f"http.token_file {path}: the token must be at least 16 characters "
                         "(e.g. python3 -c 'import secrets; print(secrets.token_urlsafe(32))')")
    return token


def tls_context(cfg: HttpConfig) -> ssl.SSLContext | None:
    if cfg.cert_file is None:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        ctx.load_cert_chain(str(cfg.cert_file), str(cfg.key_file))
    except (OSError, ssl.SSLError) as exc:
        raise ValueError(f"http.cert_file/key_file: cannot load them ({exc})") from None
    return ctx


class WebServer:
    """Serves the page, the API, MJPEG and /metrics for ``backend`` on ``cfg.listen``."""

    def __init__(self, cfg: HttpConfig, backend: WebBackend):
        self.cfg = cfg
        self.backend = backend
        self.token = read_token(cfg.token_file) if cfg.token_file is not None else None
        self.ssl = tls_context(cfg)
        self.conns = Connections()
        self.routes = Routes(backend, max_viewers=cfg.max_viewers, stream_fps=cfg.stream_fps, conns=self.conns)
        self.port: int | None = None  # bound port (cfg may say 0)
        self.error: str | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner: web.AppRunner | None = None
        self._server: asyncio.Server | None = None
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._run, name="http", daemon=True)

    @property
    def url(self) -> str:
        host, _ = self.cfg.host_port
        host = f"[{host}]" if ":" in host else host
        return f"{'https' if self.ssl else 'http'}://{host}:{self.port}"

    def start(self, timeout: float = 10.0) -> bool:
        """Bind and serve; False (with ``error``) when the address cannot be used: the agent runs on without it."""
        self._thread.start()
        self._started.wait(timeout)
        return self.port is not None

    def stop(self, timeout: float = 5.0) -> None:
        loop = self._loop
        if loop is None or not self._thread.is_alive():
            return
        self.routes.closing = True
        fut = asyncio.run_coroutine_threadsafe(self._shutdown(), loop)
        try:
            fut.result(timeout)
        except Exception:  # noqa: BLE001 - stopping: say it, go on
            log.warning("http server did not stop cleanly")
        loop.call_soon_threadsafe(loop.stop)
        self._thread.join(timeout)

    # -- the server's thread ------------------------------------------------------------------------
    def _run(self) -> None:
        name_this_thread("ea-http")
        loop = asyncio.new_event_loop()
        self._loop = loop
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(self._serve())
        except OSError as exc:
            self.error = f"http.listen {self.cfg.listen}: {exc.strerror or exc}"
            log.error("%s; the page, API and metrics are off (the agent runs on)", self.error)
            self._started.set()
            loop.close()
            return
        self._started.set()
        try:
            loop.run_forever()
        finally:
            loop.close()

    async def _serve(self) -> None:
        app = web.Application(middlewares=[self._guard], client_max_size=self.routes.max_body)
        self.routes.add_to(app)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=1.0,
                                     keepalive_timeout=KEEPALIVE_S)
        await self._runner.setup()
        host, port = self.cfg.host_port
        try:
            self._server = await asyncio.get_running_loop().create_server(
                self.conns.factory(self._runner.server), host, port, ssl=self.ssl, reuse_address=True, backlog=128)
        except OSError:
            await self._runner.cleanup()
            raise
        self.port = self._server.sockets[0].getsockname()[1] if self._server.sockets else port
        log.info("http: the page, API and metrics at %s/ (%s)", self.url,
                 "Bearer token required" if self.token else "loopback only, no token")

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
        if self._runner is not None:
            await self._runner.cleanup()

    @web.middleware
    async def _guard(self, request: web.Request, handler):
        self.conns.started(request.transport)
        try:
            refused = self._refuse(request)
            if refused is not None:
                return refused
            response = await handler(request)
        except web.HTTPException as exc:  # aiohttp's own 404, 405, 413 ...: one JSON line like ours
            if exc.status < 400:
                raise
            return web.json_response({"error": exc.reason if exc.status != 413 else exc.text}, status=exc.status,
                                     headers={k: v for k, v in exc.headers.items() if k == "Allow"})
        except (asyncio.CancelledError, ConnectionError):
            raise
        except Exception as exc:  # noqa: BLE001 - one line in the log and to the client, never a traceback
            log.error("http %s %s: %s: %s", request.method, request.path[:80], type(exc).__name__, str(exc)[:200])
            return web.json_response({"error": f"internal error: {type(exc).__name__}"}, status=500)
        if self.token is not None and request.query.get("token") and isinstance(response, web.StreamResponse) \
                and not response.prepared:
            response.set_cookie(COOKIE, self.token, httponly=True, samesite="Strict", secure=self.ssl is not None)
        return response

    def _refuse(self, request: web.Request) -> web.Response | None:
        if self.token is not None:
            if not self._authorized(request):
                return web.json_response({"error": "a Bearer token is required (Authorization: Bearer <token>, "
                                          "or open /?token=<token> once in a browser)"}, status=401,
                                         headers={"WWW-Authenticate": 'Bearer realm="edge-agent"'})
        elif not loopback_host(request.host):
            return web.json_response({"error": f"Host {request.host[:80]!r} is not a loopback name; this agent "
                                      "serves loopback only (set http.token_file to serve other names)"}, status=403)
        if request.method == "POST" and request.path not in self.routes.binary_posts \
                and not request.path.endswith("/infer") and request.content_type != "application/json":
            return web.json_response({"error": "send commands as application/json"}, status=415)
        return None

    def _authorized(self, request: web.Request) -> bool:
        assert self.token is not None
        given = ""
        scheme, _, value = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() == "bearer":  # the scheme is case-insensitive (RFC 7235)
            given = value.strip()
        elif request.query.get("token"):
            given = request.query["token"]
        elif request.cookies.get(COOKIE):
            given = request.cookies[COOKIE]
        # surrogateescape: a header of undecodable bytes compares (unequal) instead of raising
        return bool(given) and hmac.compare_digest(given.encode("utf-8", "surrogateescape"), self.token.encode())


def loopback_host(host: str) -> bool:
    """The Host header names this machine's loopback: ``localhost`` or a loopback IP literal, any port.

    Exact, not a prefix: ``127.evil.example`` is a name that DNS rebinding can point at 127.0.0.1.
    """
    name, port = host.strip(), ""
    if name.startswith("[") and "]" in name:  # [::1]:8080
        name, port = name[1:name.index("]")], name[name.index("]") + 1:]
    elif name.count(":") == 1:
        name, port = name.split(":")
        port = ":" + port
    return (not port or port[0] == ":" and port[1:].isdigit()) and loopback_name(name)
