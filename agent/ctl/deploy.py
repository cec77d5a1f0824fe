"""agent-ctl deploy and agent-ctl keygen: a signed manifest published, its chunks served, every target followed."""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import paho.mqtt.client as paho

from agent.ctl.args import SECONDS, SECONDS_OR_ZERO, number
from agent.ctl.client import MqttSession, absent, ctl_config, json_object, last_status, signing_key
from agent.ctl.errors import EXIT_FAILED, EXIT_OK, UsageError
from agent.deploy.golden import make_golden
from agent.deploy.manifest import (
    DEFAULT_CHUNK_BYTES,
    MAX_CHUNK_BYTES,
    MIN_CHUNK_BYTES,
    ManifestRejected,
    key_id,
    parse_manifest,
    public_key_text,
    sign,
)
from agent.deploy.release import DEFAULT_EXPIRES_S
from agent.inference.modelfile import declared_labels, file_sha256, read_manifest
from agent.messaging.topics import Topics, chunk_topic, device_of, group_deploy
from agent.runtimes import detect_format
from agent.vision.registry import task_names
from agent.vocab import TERMINAL_STATES


def safe_name(text: str) -> str:
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-.") or "model"
    return name[:100]


def build_manifest(args, model_path: Path, target: dict | None = None) -> tuple[dict, bytes]:
    """The manifest dict and the model bytes; UsageError for bad input.

    ``target`` ({"devices": [...]} or {"group": ...}) goes into the signed body with the issue and
    expiry times, the signing key's id and a release counter (milliseconds since the epoch: every new
    deployment from any operator's machine counts higher than the last).
    """
    if not model_path.is_file():
        raise UsageError(f"model file not found: {model_path}")
    try:
        fmt = detect_format(model_path)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    try:
        side = read_manifest(model_path)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    task = args.task or side.task
    if task is None:
        raise UsageError(f"no task: pass --task ({', '.join(task_names())}) or put task: in "
                         "a model.yaml beside the model")
    if args.labels and not Path(args.labels).is_file():
        raise UsageError(f"labels file not found: {args.labels}")
    try:
        labels = list(declared_labels(model_path, side, Path(args.labels) if args.labels else None))
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    data = model_path.read_bytes()
    name = safe_name(args.name or side.name or model_path.stem)
    version = safe_name(args.version or (side.version if side.version != "0" else time.strftime("%Y%m%d%H%M%S")))
    spec: dict = {"name": name, "version": version, "format": fmt, "sha256": file_sha256(model_path),
                  "size": len(data), "task": task}
    if labels:
        spec["labels"] = labels
    pre = side.preprocess.model_dump(exclude_defaults=True)
    if pre:
        spec["preprocess"] = pre
    dec = side.decode.model_dump(exclude_defaults=True)
    if dec:
        spec["decode"] = dec
    if args.url:
        source: dict = {"type": "url", "url": args.url}
    else:
        chunk = args.chunk_kb * 1024
        n = max(1, -(-len(data) // chunk))
        source = {"type": "mqtt", "chunks": n, "chunk_size": chunk,
                  "chunk_sha256": [hashlib.sha256(data[i * chunk:(i + 1) * chunk]).hexdigest() for i in range(n)]}
    now = time.time()
    raw: dict = {"deployment_id": f"{name}-{version}-{uuid.uuid4().hex[:8]}", "model": spec, "source": source,
                 "created": now, "issued_at": now,
                 "expires_at": now + getattr(args, "expires_in", DEFAULT_EXPIRES_S), "counter": int(now * 1000)}
    if target is not None:
        raw["target"] = target
    asked = {k: v for k, v in (("seconds", getattr(args, "probation_s", None)),
                               ("latency_factor", getattr(args, "latency_allowance", None))) if v is not None}
    if asked:
        raw["probation"] = asked
    if not args.no_golden:
        try:
            raw["golden"] = make_golden(model_path, task).model_dump()
        except Exception as exc:  # noqa: BLE001 - a model this machine can't run is deployed without golden data
            print(f"note: no golden check (this machine could not run the model: {exc})", file=sys.stderr)
    if args.sign_key:
        key = signing_key(Path(args.sign_key))
        raw["key_id"] = key_id(key.public_key())
        raw["signature"] = sign(raw, key)
    try:  # what the device will check, checked here first: a bad key never costs an upload
        parse_manifest(json.dumps(raw).encode())
    except ManifestRejected as exc:
        raise UsageError(str(exc)) from None
    return raw, data


@dataclass
class Target:
    device: str
    state: str = "waiting"
    progress: float = 0.0
    error: str | None = None
    started: float = field(default_factory=time.monotonic)
    ended: float | None = None


class DeployRun:
    """Publishes a manifest, serves its chunks to every target that asks, follows their events."""

    def __init__(self, session, cfg, raw: dict, data: bytes, *, device: str | None, group: str | None):
        self.s, self.cfg, self.raw, self.data = session, cfg, raw, data
        self.id = raw["deployment_id"]
        self.payload = json.dumps(raw).encode()  # what is published, byte for byte
        self.payload_sha256 = hashlib.sha256(self.payload).hexdigest()[:16]
        self.prefix = cfg.mqtt.prefix
        self.group = group
        self.targets: dict[str, Target] = {}
        self.lock = threading.Lock()
        self.changed = threading.Event()
        self.sent_group_chunks = False
        self.chunk_size = raw["source"].get("chunk_size", 0)
        if group:
            self.manifest_topic = group_deploy(self.prefix, group)
        else:
            self.manifest_topic = Topics(self.prefix, device).deploy
            self.targets[device] = Target(device)

    def chunks(self, indices=None):
        n = self.raw["source"].get("chunks", 0)
        for i in indices if indices is not None else range(n):
            if 0 <= i < n:
                yield i, self.data[i * self.chunk_size:(i + 1) * self.chunk_size]

    def publish_chunks(self, base: str, indices=None) -> None:
        for i, chunk in self.chunks(indices):
            self.s.client.publish(chunk_topic(base, self.id, i), chunk, qos=1)

    def on_event(self, msg: paho.MQTTMessage) -> None:
        dev = device_of(msg.topic, self.prefix)
        ev = json_object(msg)
        if dev is None or ev is None or ev.get("deployment_id") != self.id:
            return
        if ev.get("manifest_sha256") not in (None, self.payload_sha256):
            return  # a rejection of other bytes that claimed this id (a forged copy): not about ours
        with self.lock:
            t = self.targets.get(dev)
            if t is None:
                if not self.group:
                    return
                t = self.targets[dev] = Target(dev)  # a group member we did not know about
            if t.state in TERMINAL_STATES:
                return
            state = ev.get("state", t.state)
            if state == "received" and self.raw["source"]["type"] == "mqtt":
                if self.group and not self.sent_group_chunks:
                    self.sent_group_chunks = True
                    threading.Thread(target=self.publish_chunks, daemon=True,
                                     args=(group_deploy(self.prefix, self.group),)).start()
                elif not self.group:
                    threading.Thread(target=self.publish_chunks, daemon=True,
                                     args=(Topics(self.prefix, dev).deploy,)).start()
            if ev.get("need"):
                threading.Thread(target=self.publish_chunks, daemon=True,
                                 args=(Topics(self.prefix, dev).deploy, list(ev["need"]))).start()
            t.state = state
            if isinstance(ev.get("progress"), int | float):
                t.progress = float(ev["progress"])
            if ev.get("error"):
                t.error = ev["error"]
            if state in TERMINAL_STATES:
                t.ended = time.monotonic()
        self.changed.set()

    def on_status(self, msg: paho.MQTTMessage) -> None:
        dev = device_of(msg.topic, self.prefix)
        st = json_object(msg)
        if dev and st and self.group in (st.get("groups") or []) and st.get("state") == "online":
            with self.lock:
                self.targets.setdefault(dev, Target(dev))
            self.changed.set()


def _bar(p: float, width: int = 20) -> str:
    n = int(round(p * width))
    return "#" * n + "-" * (width - n)


def cmd_deploy(args) -> int:
    cfg = ctl_config(args)
    device = None if args.group else (args.device or cfg.device_id)
    raw, data = build_manifest(args, Path(args.model), {"group": args.group} if args.group else {"devices": [device]})
    s = MqttSession(cfg)
    run = DeployRun(s, cfg, raw, data, device=device, group=args.group)
    try:
        s.subscribe(f"{cfg.mqtt.prefix}/{device or '+'}/events", run.on_event)
        if args.group:
            s.subscribe(f"{cfg.mqtt.prefix}/+/status", run.on_status)
            time.sleep(1.0)  # gather the retained statuses: who is in the group
        size_mb = len(data) / 2**20
        print(f"deploying {raw['model']['name']} {raw['model']['version']} ({raw['model']['format']}, "
              f"{size_mb:.2f} MB, sha256 {raw['model']['sha256'][:12]}…) as {run.id} to "
              f"{'group ' + args.group if args.group else 'device ' + device}", file=sys.stderr)
        s.publish(run.manifest_topic, run.payload, qos=1, retain=True)
        status = last_status(s, cfg.mqtt.prefix, device) if device is not None and not args.no_wait else {}
        if status is None:  # never connected to this broker: nobody to wait for, so say so now
            print(f"{absent(device, None)}; the manifest stays retained and is applied if it connects "
                  "(agent-ctl cancel removes it)", file=sys.stderr)
            return EXIT_FAILED
        if device is not None and (why := absent(device, status)):  # seen before: it may well come back
            print(f"{why}; waiting up to {args.timeout:.0f} s for it to connect and take the retained manifest",
                  file=sys.stderr)
        if args.no_wait:
            if raw["source"]["type"] == "mqtt":
                run.publish_chunks(run.manifest_topic)
            print(f"published {run.id}; not waiting (agent-ctl status shows the result)", file=sys.stderr)
            return EXIT_OK
        return _follow(run, args.timeout, args.group, done="active" if args.no_probation_wait else "committed")
    finally:
        s.close()


def _follow(run: DeployRun, timeout: float, group: str | None, done: str = "committed") -> int:
    """Show each target's progress until every one is ``done`` (committed: passed probation) or failed."""
    over = TERMINAL_STATES | {done}
    deadline = time.monotonic() + timeout
    shown: dict[str, tuple[str, int]] = {}
    t0 = time.monotonic()
    tty = sys.stderr.isatty()
    while time.monotonic() < deadline:
        run.changed.wait(0.5)
        run.changed.clear()
        with run.lock:
            targets = dict(run.targets)
        for dev, t in sorted(targets.items()):
            step = int(t.progress * 10) if t.state == "downloading" else -1
            if shown.get(dev) != (t.state, step):
                shown[dev] = (t.state, step)
                detail = f" [{_bar(t.progress)}] {t.progress:4.0%}" if t.state == "downloading" else ""
                err = f": {t.error}" if t.error else ""
                print(f"{'' if not tty else chr(13)}{dev:<20} {t.state:<11}{detail}{err}", file=sys.stderr)
        if targets and all(t.state in over for t in targets.values()):
            if group and time.monotonic() - t0 < 2.0:
                continue  # let late-reporting group members show up
            break
    with run.lock:
        targets = dict(run.targets)
    if not targets:
        print(f"no device in group {group!r} answered within {timeout:.0f} s; the manifest stays retained "
              "for devices that connect later", file=sys.stderr)
        return EXIT_FAILED
    bad = {d: t for d, t in targets.items() if t.state not in (done, "committed")}
    took = time.monotonic() - t0
    if not bad:
        print(f"{done} on {len(targets)} device(s) in {took:.1f} s", file=sys.stderr)
        return EXIT_OK
    for dev, t in sorted(bad.items()):
        if t.state in TERMINAL_STATES:
            print(f"{dev}: {t.state}: {t.error or 'no reason given'}", file=sys.stderr)
        elif t.state == "active":
            print(f"{dev}: active, still in probation after {timeout:.0f} s (--timeout longer than the probation, "
                  "or --no-probation-wait)", file=sys.stderr)
        elif t.state == "waiting":
            print(f"{dev}: no answer within {timeout:.0f} s (offline? the manifest stays retained and is applied "
                  "when it connects)", file=sys.stderr)
        else:
            print(f"{dev}: still {t.state} after {timeout:.0f} s", file=sys.stderr)
    return EXIT_FAILED


def cmd_cancel(args) -> int:
    """Clear the retained manifest (a device's or a group's): devices that connect later no longer take it."""
    cfg = ctl_config(args)
    topic = group_deploy(cfg.mqtt.prefix, args.group) if args.group else \
        Topics(cfg.mqtt.prefix, args.device or cfg.device_id).deploy
    s = MqttSession(cfg)
    try:
        s.publish(topic, b"", qos=1, retain=True)  # an empty retained message deletes the retained one
    finally:
        s.close()
    print(f"cleared the retained manifest on {topic} (a deployment already running on a device goes on)")
    return EXIT_OK


def cmd_keygen(args) -> int:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    key_path, pub_path = Path(f"{args.out}.key"), Path(f"{args.out}.pub")
    for p in (key_path, pub_path):
        if p.exists() and not args.force:
            raise UsageError(f"{p} exists; pass --force to replace it")
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    public = public_key_text(key.public_key())
    try:
        fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(pem)
        pub_path.write_text(public + "\n")
    except OSError as exc:
        key_path.unlink(missing_ok=True)  # never half a pair
        raise UsageError(f"--out {args.out}: cannot write {exc.filename or key_path} ({exc.strerror})") from None
    print(f"private key: {key_path} (keep it secret; agent-ctl deploy --sign-key {key_path})")
    print(f"public key:  {pub_path}")
    print("add to each device's agent.yaml:\n  deploy:\n    trusted_keys:\n      - " + public)
    return EXIT_OK


def add_parsers(sub) -> None:
    sp = sub.add_parser("deploy", help="push a model to a device or group; exit 0 when every target is active")
    sp.add_argument("model", help=".tflite or .onnx file (a model.yaml beside it supplies task, labels, preprocess)")
    target = sp.add_mutually_exclusive_group()
    target.add_argument("--device", help="device id (default: the config's device_id)")
    target.add_argument("--group", help="every device in this fleet group")
    sp.add_argument("--name")
    sp.add_argument("--version")
    sp.add_argument("--task", choices=task_names())
    sp.add_argument("--labels", help="labels file, one per line")
    sp.add_argument("--url", help="devices download the model from this http(s)/file URL instead of MQTT chunks")
    sp.add_argument("--sign-key", help="Ed25519 private key (from agent-ctl keygen) to sign the manifest")
    sp.add_argument("--timeout", type=SECONDS, default=300, help="seconds to wait for every target (default 300)")
    sp.add_argument("--no-wait", action="store_true", help="publish and exit")
    sp.add_argument("--no-probation-wait", action="store_true",
                    help="exit 0 at active, without waiting for probation to pass (committed)")
    sp.add_argument("--probation-s", type=SECONDS_OR_ZERO, metavar="SECONDS",
                    help="probation on the device for this deployment (default: its deploy.probation_s)")
    sp.add_argument("--latency-allowance", type=number(float, low=1), metavar="FACTOR",
                    help="inference p95 allowed in probation, times the previous model's (default 3: its config)")
    sp.add_argument("--expires-in", type=SECONDS, default=DEFAULT_EXPIRES_S, metavar="SECONDS",
                    help="devices refuse the manifest after this long (default 7 days)")
    sp.add_argument("--no-golden", action="store_true", help="skip the golden-output check")
    sp.add_argument("--chunk-kb", type=number(int, low=MIN_CHUNK_BYTES // 1024, high=MAX_CHUNK_BYTES // 1024),
                    default=DEFAULT_CHUNK_BYTES // 1024,
                    help="MQTT chunk size in KiB (default 96: fits AWS IoT Core's 128 KiB limit)")
    sp.set_defaults(func=cmd_deploy)

    sp = sub.add_parser("cancel", help="clear the retained manifest of a device or group")
    target = sp.add_mutually_exclusive_group()
    target.add_argument("--device", help="device id (default: the config's device_id)")
    target.add_argument("--group", help="a fleet group")
    sp.set_defaults(func=cmd_cancel)

    sp = sub.add_parser("keygen", help="write an Ed25519 key pair for signing deployments")
    sp.add_argument("--out", default="edge-agent-signing", help="file prefix: PREFIX.key and PREFIX.pub")
    sp.add_argument("--force", action="store_true")
    sp.set_defaults(func=cmd_keygen)
