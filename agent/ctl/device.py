"""agent-ctl rollback, models and snapshot: one command to one device, one answer back."""

from __future__ import annotations

import base64
import json
import threading
import time
import uuid
from pathlib import Path

import paho.mqtt.client as paho

from agent.ctl.args import SECONDS
from agent.ctl.client import MqttSession, absent, ctl_config, json_object, last_status, signing_key
from agent.ctl.errors import EXIT_OK, CtlError, UsageError
from agent.deploy.manifest import key_id, sign
from agent.messaging.topics import Topics
from agent.vocab import STATE_CHANGING_COMMANDS

SIGNED_FOR_S = 60  # a signed command is good for this long, and for one device, once


def signed_body(command: str, rid: str, device: str, key_path: Path, extra: dict | None = None) -> dict:
    """A state-changing request signed like a manifest: for ``device``, expiring in SIGNED_FOR_S."""
    key = signing_key(key_path)
    now = time.time()
    body = {"command": command, "request_id": rid, "device": device, "issued_at": now,
            "expires_at": now + SIGNED_FOR_S, "key_id": key_id(key.public_key()), **(extra or {})}
    body["signature"] = sign(body, key)
    return body


def request(cfg, device: str, command: str, timeout: float, sign_key: Path | None = None,
            extra: dict | None = None) -> dict:
    """Send one cmd (with ``extra`` fields; signed with ``sign_key`` when given) and wait for the response."""
    topics = Topics(cfg.mqtt.prefix, device)
    rid = uuid.uuid4().hex
    body = signed_body(command, rid, device, sign_key, extra) if sign_key else \
        {"command": command, "request_id": rid, **(extra or {})}
    got: dict = {}
    done = threading.Event()

    def on_resp(msg: paho.MQTTMessage) -> None:
        data = json_object(msg)
        if data and data.get("request_id") == rid:
            got.update(data)
            done.set()

    s = MqttSession(cfg)
    try:
        if why := absent(device, last_status(s, cfg.mqtt.prefix, device)):
            raise CtlError(f"{why}: it cannot answer {command}")
        s.subscribe(topics.cmd_response, on_resp)
        s.publish(topics.cmd, json.dumps(body).encode(), qos=1)
        if not done.wait(timeout):
            raise CtlError(f"no answer from {device} within {timeout:.0f} s (is it online? agent-ctl status)")
    finally:
        s.close()
    if not got.get("ok"):
        raise CtlError(f"{device}: {command} failed: {got.get('error')}")
    return got


def device_request(args, command: str, extra: dict | None = None) -> tuple[str, dict]:
    """The device named by --device (or the config's) and its answer to ``command``."""
    cfg = ctl_config(args)
    device = args.device or cfg.device_id
    key = getattr(args, "sign_key", None)
    return device, request(cfg, device, command, args.timeout, Path(key) if key else None, extra)


def cmd_rollback(args) -> int:
    device, resp = device_request(args, "rollback", {"to": args.to} if args.to else None)
    m = resp.get("model") or {}
    print(f"{device}: rolled back to {m.get('name')} {m.get('version')} ({str(m.get('sha256'))[:12]}…)")
    return EXIT_OK


def cmd_reload(args) -> int:
    device, _ = device_request(args, "reload")
    print(f"{device}: re-reading its configuration (its log says what applied)")
    return EXIT_OK


def cmd_models(args) -> int:
    _, resp = device_request(args, "models")
    if args.json:
        print(json.dumps(resp, indent=2))
        return EXIT_OK
    for m in resp.get("models", []):
        mark = "*" if m.get("active") else " "
        print(f"{mark} {m.get('name')} {m.get('version')}  {m.get('format')}  {m.get('task')}  {str(m.get('sha256'))[:12]}")
    return EXIT_OK


def cmd_snapshot(args) -> int:
    if args.out and not Path(args.out).parent.is_dir():  # said before the device is asked
        raise UsageError(f"--out {args.out}: no directory {Path(args.out).parent}")
    device, resp = device_request(args, "snapshot")
    out = Path(args.out or f"{device}-snapshot.jpg")
    try:
        out.write_bytes(base64.b64decode(resp["jpeg"]))
    except OSError as exc:
        raise UsageError(f"--out {out}: cannot write it ({exc.strerror})") from None
    print(f"{out}: {resp['width']}x{resp['height']} frame from {device}")
    return EXIT_OK


def add_parsers(sub) -> None:
    for name, func, helptext in (("rollback", cmd_rollback, "roll a device back to its previous model"),
                                 ("reload", cmd_reload, "make a device re-read its configuration"),
                                 ("models", cmd_models, "models installed on a device (active marked *)"),
                                 ("snapshot", cmd_snapshot, "save the device's newest frame as a JPEG")):
        sp = sub.add_parser(name, help=helptext)
        sp.add_argument("--device", help="device id (default: the config's device_id)")
        sp.add_argument("--timeout", type=SECONDS, default=30)
        if name == "rollback":
            sp.add_argument("--to", metavar="VERSION", help="a stored version (agent-ctl models lists them); "
                            "default: the previous one")
        if name in STATE_CHANGING_COMMANDS:
            sp.add_argument("--sign-key", help="Ed25519 private key: devices with trusted keys need it")
        if name == "models":
            sp.add_argument("--json", action="store_true")
        if name == "snapshot":
            sp.add_argument("--out", help="JPEG file (default: DEVICE-snapshot.jpg)")
        sp.set_defaults(func=func)
