"""The command protocol on ``<device>/cmd``: a request is checked, answered once on cmd/response, never retained.

``parse_request`` is a pure function (tested on raw bytes); ``Commands`` routes what it returns.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass

from agent.messaging.payloads import CommandReply

log = logging.getLogger(__name__)
MAX_COMMAND_BYTES = 64 * 1024
COMMANDS = ("rollback", "models", "snapshot", "reload", "status")
DEPLOYER_COMMANDS = ("rollback", "models")  # answered on the deployer's thread, in order with deployments

RequestId = str | int | None


@dataclass(frozen=True)
class CommandRequest:
    command: str
    request_id: RequestId = None


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
    return CommandRequest(command, rid)


class Commands:
    """Answers requests: the deployer's through ``deployer_request``, the rest through ``handlers``."""

    def __init__(self, *, respond: Callable[[dict], None],
                 deployer_request: Callable[[str, Callable[[CommandReply], None]], None],
                 handlers: dict[str, Callable[[], CommandReply]]):
        self.respond = respond
        self.deployer_request = deployer_request
        self.handlers = handlers

    def on_message(self, topic: str, payload: bytes, retain: bool) -> None:
        if retain:
            # A retained command would re-run on every reconnect (restart loops): never act on one.
            log.warning("ignoring a retained command on %s", topic)
            return
        try:
            req = parse_request(payload)
        except BadRequest as exc:
            self.respond(CommandReply.failed(str(exc)).to_json(exc.request_id))
            return
        if req.command in DEPLOYER_COMMANDS:
            self.deployer_request(req.command, lambda reply: self.respond(reply.to_json(req.request_id)))
            return
        try:
            reply = self.handlers[req.command]()
        except ValueError as exc:
            reply = CommandReply.failed(str(exc))
        self.respond(reply.to_json(req.request_id))
