"""The command protocol on ``<device>/cmd``: a request is checked, answered once on cmd/response, never retained.

``parse_request`` is a pure function (tested on raw bytes); ``Commands`` routes what it returns.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from agent.deploy.manifest import ManifestRejected, check_signature
from agent.messaging.payloads import CommandReply
from agent.vocab import STATE_CHANGING_COMMANDS

log = logging.getLogger(__name__)
MAX_COMMAND_BYTES = 64 * 1024
COMMANDS = ("rollback", "models", "snapshot", "reload", "status")
DEPLOYER_COMMANDS = ("rollback", "models")  # answered on the deployer's thread, in order with deployments

RequestId = str | int | None


MAX_SIGNED_AGE_S = 300  # a signed command is refused after its expires_at and never later than this


@dataclass(frozen=True)
class CommandRequest:
    command: str
    request_id: RequestId = None
    body: dict = field(default_factory=dict)  # the whole request, for its signature


class BadRequest(ValueError):
    """A request that cannot be run; the reply carries the message and whatever request_id could be read."""

    def __init__(self, message: str, request_id: RequestId = None):
        super().__init__(message)
        self.request_id = request_id


def parse_request(payload: bytes) -> CommandRequest:
    """A request from its payload; BadRequest says what is wrong with it."""
    if len(payload) > MAX_COMMAND_BYTES:
        raise BadRequest(f"command payload is {len(payload)} bytes; the limit is {MAX_COMMAND_BYTES}")
    try:
        req = json.loads(payload)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadRequest(str(exc)) from None
    except RecursionError:  # 64 KiB of '[' nests deeper than the parser goes
        raise BadRequest("command is nested too deeply to be a command") from None
    if not isinstance(req, dict):
        raise BadRequest("command must be a JSON object")
    rid = req.get("request_id")
    if rid is not None and not (isinstance(rid, str) and len(rid) <= 128
                                or isinstance(rid, int) and not isinstance(rid, bool)):
        raise BadRequest("request_id must be a string of at most 128 characters or an integer")
    command = req.get("command")
    if not isinstance(command, str):
        raise BadRequest(f"command must be a string: {', '.join(COMMANDS[:-1])} or {COMMANDS[-1]}", rid)
    if command not in COMMANDS:
        raise BadRequest(f"unknown command {command[:40]!r}; expected one of: {', '.join(COMMANDS)}", rid)
    return CommandRequest(command, rid, req)


class SignedCommands:
    """Which state-changing requests are authentic, fresh, for this device and not seen before."""

    def __init__(self, device_id: str, trusted: Callable[[], list[Ed25519PublicKey]]):
        self.device_id = device_id
        self.trusted = trusted  # read on every request: a reload that adds keys applies at once
        self._seen: dict[tuple[str, str], float] = {}  # (signature, request_id) -> until when it is kept

    def check(self, req: CommandRequest, now: float | None = None) -> None:
        """Nothing when no keys are trusted or the command changes nothing; BadRequest otherwise."""
        keys = self.trusted()
        if not keys or req.command not in STATE_CHANGING_COMMANDS:
            return
        now = time.time() if now is None else now
        body = req.body
        try:
            check_signature(body, keys, what=req.command, how=f"agent-ctl {req.command} --sign-key FILE")
        except ManifestRejected as exc:
            raise BadRequest(str(exc), req.request_id) from None
        if body.get("device") != self.device_id:
            raise BadRequest(f"signed for device {str(body.get('device'))[:64]!r}, not {self.device_id!r}",
                             req.request_id)
        expires = body.get("expires_at")
        if not isinstance(expires, int | float) or isinstance(expires, bool) or not now <= expires:
            raise BadRequest("expired or without expires_at (agent-ctl signs commands for 60 s)", req.request_id)
        if expires > now + MAX_SIGNED_AGE_S:
            raise BadRequest(f"expires_at is more than {MAX_SIGNED_AGE_S} s ahead", req.request_id)
        self._seen = {k: until for k, until in self._seen.items() if until >= now}
        key = (str(body.get("signature")), str(req.request_id))
        if key in self._seen:
            raise BadRequest("this signed command was already run (a replay)", req.request_id)
        self._seen[key] = float(expires)


class Commands:
    """Answers requests: the deployer's through ``deployer_request``, the rest through ``handlers``."""

    def __init__(self, *, respond: Callable[[dict], None],
                 deployer_request: Callable[[str, Callable[[CommandReply], None], dict], None],
                 handlers: dict[str, Callable[[], CommandReply]], signed: SignedCommands | None = None):
        self.respond = respond
        self.deployer_request = deployer_request
        self.handlers = handlers
        self.signed = signed

    def on_message(self, topic: str, payload: bytes, retain: bool) -> None:
        if retain:
            # A retained command would re-run on every reconnect (restart loops): never act on one.
            log.warning("ignoring a retained command on %s", topic)
            return
        try:
            req = parse_request(payload)
            if self.signed is not None:
                self.signed.check(req)
        except BadRequest as exc:
            self.respond(CommandReply.failed(str(exc)).to_json(exc.request_id))
            return
        if req.command in DEPLOYER_COMMANDS:
            self.deployer_request(req.command, lambda reply: self.respond(reply.to_json(req.request_id)), req.body)
            return
        try:
            reply = self.handlers[req.command]()
        except ValueError as exc:
            reply = CommandReply.failed(str(exc))
        self.respond(reply.to_json(req.request_id))
