"""agent-ctl: a client of the MQTT API (and of the local probe and config checker), never a back door."""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
import uuid
from pathlib import Path

import paho.mqtt.client as paho

from agent import __version__
from agent.config import AgentConfig, ConfigError, default_config_path, load_config, parse_config
from agent.mqtt import make_client
from agent.topics import device_of

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


class CtlError(Exception):
    """An operation failed (exit 1); the message is for the user."""


def _config(args) -> AgentConfig:
    path = Path(args.config) if args.config else default_config_path()
    try:
        cfg = load_config(path) if path.exists() else parse_config({}, "defaults")
    except ConfigError as exc:
        raise UsageError(f"invalid configuration in {exc.source}:\n  " + "\n  ".join(exc.problems)) from None
    if args.broker:
        try:
            cfg.mqtt.url = args.broker
        except ValueError as exc:
            raise UsageError(f"--broker: {exc.errors()[0]['msg'].removeprefix('Value error, ')}") from None
    return cfg


class UsageError(Exception):
    """Bad usage or bad input (exit 2)."""


class Session:
    """A short-lived MQTT client for one command."""

    def __init__(self, cfg: AgentConfig, timeout: float = 5.0):
        self.cfg = cfg
        self.client, self.endpoint = make_client(cfg.mqtt, f"agent-ctl-{uuid.uuid4().hex[:8]}")
        self._connected = threading.Event()
        self._error: str | None = None
        self._topics: list[str] = []
        self.client.on_connect = self._on_connect
        try:
            self.client.connect(self.endpoint.host, self.endpoint.port, keepalive=30)
        except OSError as exc:
            raise CtlError(f"cannot reach the broker at {self.endpoint}: {exc.strerror or exc}") from None
        self.client.loop_start()
        if not self._connected.wait(timeout):
            self.close()
            raise CtlError(self._error or f"no answer from the broker at {self.endpoint} within {timeout:.0f} s")

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            self._error = f"the broker at {self.endpoint} refused the connection: {reason_code}"
        else:
            for topic in self._topics:  # again after a reconnect: the broker forgot a clean session
                client.subscribe(topic, qos=1)
            self._connected.set()

    def subscribe(self, topic: str, on_message) -> None:
        self.client.message_callback_add(topic, lambda c, u, m: on_message(m))
        self._topics.append(topic)
        self.client.subscribe(topic, qos=1)

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> None:
        self.client.publish(topic, payload, qos=qos, retain=retain).wait_for_publish(10)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def _json(msg: paho.MQTTMessage) -> dict | None:
    try:
        data = json.loads(msg.payload)
    except (ValueError, UnicodeDecodeError):
        return None
    return data if isinstance(data, dict) else None


# -- commands -----------------------------------------------------------------------------------

def cmd_probe(args) -> int:
    from agent import probe

    facts = probe.probe()
    if args.json:
        choices = {}
        for fmt in ("tflite", "onnx"):
            try:
                c = probe.choose_runtime(facts, fmt)
                choices[fmt] = {"backend": c.backend, "module": c.module, "accelerator": c.accelerator,
                                "providers": list(c.providers), "reason": c.reason}
            except probe.RuntimeChoiceError as exc:
                choices[fmt] = {"error": str(exc)}
        print(json.dumps({**facts.to_json(), "choice": choices}, indent=2))
    else:
        print(probe.format_report(facts))
    return EXIT_OK


def cmd_config_check(args) -> int:
    try:
        cfg = load_config(args.file)
    except ConfigError as exc:
        print(f"{exc.source}: invalid", file=sys.stderr)
        for line in exc.problems:
            print(f"  {line}", file=sys.stderr)
        return EXIT_USAGE
    problems = []
    if not cfg.model.path.is_file():
        problems.append(f"model.path: file not found: {cfg.model.path}")
    if cfg.model.labels is not None and not cfg.model.labels.is_file():
        problems.append(f"model.labels: file not found: {cfg.model.labels}")
    for key in ("password_file", "ca_file", "cert_file", "key_file"):
        p = getattr(cfg.mqtt, key)
        if p is not None and not Path(p).is_file():
            problems.append(f"mqtt.{key}: file not found: {p}")
    if problems:
        print(f"{args.file}: invalid", file=sys.stderr)
        for line in problems:
            print(f"  {line}", file=sys.stderr)
        return EXIT_USAGE
    print(f"{args.file}: ok (device {cfg.device_id}, model {cfg.model.path.name}, broker {cfg.mqtt.url})")
    return EXIT_OK


def collect_status(cfg: AgentConfig, device: str | None, wait: float) -> dict[str, dict]:
    """Retained status and health of one device or all, gathered for ``wait`` seconds."""
    prefix = cfg.mqtt.prefix
    found: dict[str, dict] = {}
    lock = threading.Lock()

    def on_msg(msg: paho.MQTTMessage) -> None:
        dev = device_of(msg.topic, prefix)
        data = _json(msg)
        if dev is None or data is None:
            return
        with lock:
            found.setdefault(dev, {})[msg.topic.rsplit("/", 1)[1]] = data

    s = Session(cfg)
    try:
        target = device or "+"
        s.subscribe(f"{prefix}/{target}/status", on_msg)
        s.subscribe(f"{prefix}/{target}/health", on_msg)
        time.sleep(wait)
    finally:
        s.close()
    return found


def _status_row(dev: str, info: dict) -> list[str]:
    st, h = info.get("status", {}), info.get("health", {})
    model = st.get("model") or {}
    lat = (h.get("latency_ms") or {}).get("inference") or {}
    age = f"{time.time() - h['ts']:.0f}s ago" if isinstance(h.get("ts"), int | float) else "-"
    return [dev, str(st.get("state", "?")), f"{model.get('name', '-')} {model.get('version', '')}".strip(),
            f"{st.get('backend', '-')}/{st.get('accelerator', '-')}",
            f"{h['fps']:.1f}" if isinstance(h.get("fps"), int | float) else "-",
            f"{lat['p95']:.1f}" if isinstance(lat.get("p95"), int | float) else "-",
            str((h.get("camera") or {}).get("state", "-")), age]


def cmd_status(args) -> int:
    cfg = _config(args)
    found = collect_status(cfg, args.device, args.wait)
    if args.device and args.device not in found:
        print(f"no status from device {args.device!r} on {cfg.mqtt.url} (prefix {cfg.mqtt.prefix!r})", file=sys.stderr)
        return EXIT_FAILED
    if args.json:
        print(json.dumps(found, indent=2, sort_keys=True))
        return EXIT_OK
    if not found:
        print(f"no devices found on {cfg.mqtt.url} under {cfg.mqtt.prefix}/")
        return EXIT_OK
    rows = [["DEVICE", "STATE", "MODEL", "RUNTIME", "FPS", "P95 MS", "CAMERA", "HEALTH"]]
    rows += [_status_row(d, found[d]) for d in sorted(found)]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    return EXIT_OK


def format_prediction(dev: str, p: dict) -> str:
    parts = []
    for r in p.get("results", [])[:10]:
        if "box" in r:
            parts.append(f"{r.get('label')} {r.get('score', 0):.2f} [{', '.join(f'{v:.2f}' for v in r['box'])}]")
        elif "label" in r:
            parts.append(f"{r.get('label')} {r.get('score', 0):.2f}")
        else:
            parts.append(f"{r.get('name')}{r.get('shape')}")
    lat = (p.get("latency_ms") or {}).get("total")
    model = p.get("model") or {}
    lat_s = f"{lat:.1f}ms" if isinstance(lat, int | float) else "-"
    return (f"{dev} #{p.get('seq')} {model.get('name')}@{model.get('version')} {lat_s}: "
            + ("; ".join(parts) if parts else "(nothing)"))


def cmd_watch(args) -> int:
    cfg = _config(args)
    prefix = cfg.mqtt.prefix
    done = threading.Event()
    seen = 0

    def on_msg(msg: paho.MQTTMessage) -> None:
        nonlocal seen
        p = _json(msg)
        if p is None or done.is_set():
            return
        dev = device_of(msg.topic, prefix) or "?"
        print(json.dumps({"device": dev, **p}) if args.json else format_prediction(dev, p), flush=True)
        seen += 1
        if args.count and seen >= args.count:
            done.set()

    s = Session(cfg)
    try:
        s.subscribe(f"{prefix}/{args.device or '+'}/predictions", on_msg)
        if not args.json:
            print(f"watching {prefix}/{args.device or '+'}/predictions on {s.endpoint} (Ctrl-C to stop)",
                  file=sys.stderr)
        done.wait(args.seconds or None)
    except KeyboardInterrupt:
        pass
    finally:
        s.close()
    if args.count and seen < args.count:
        print(f"only {seen} of {args.count} predictions arrived", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK


# -- entry --------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="agent-ctl", description="Control and watch edge-agent devices over MQTT.")
    p.add_argument("--config", help="config file for broker settings and the device id "
                   "(default: $EDGE_AGENT_CONFIG, else /etc/edge-agent/agent.yaml, else the bundled one)")
    p.add_argument("--broker", help="broker URL, overriding the config: mqtt[s]://host:port")
    p.add_argument("--version", action="version", version=f"agent-ctl {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    sp = sub.add_parser("probe", help="what the hardware probe finds and which runtime it would pick")
    sp.add_argument("--json", action="store_true")
    sp.set_defaults(func=cmd_probe)

    sp = sub.add_parser("status", help="status and last health of one device or all")
    sp.add_argument("--device", help="device id (default: all devices)")
    sp.add_argument("--json", action="store_true")
    sp.add_argument("--wait", type=float, default=1.0, help="seconds to gather retained messages (default 1)")
    sp.set_defaults(func=cmd_status)

    sp = sub.add_parser("watch", help="print live predictions")
    sp.add_argument("--device", help="device id (default: all devices)")
    sp.add_argument("--json", action="store_true", help="one JSON object per line")
    sp.add_argument("--count", type=int, default=0, help="stop after N predictions (exit 1 if fewer came)")
    sp.add_argument("--seconds", type=float, default=0, help="stop after S seconds")
    sp.set_defaults(func=cmd_watch)

    from agent.bench import add_parser as add_bench
    from agent.ctl_deploy import add_parsers

    add_parsers(sub)
    add_bench(sub)

    sp = sub.add_parser("config", help="configuration tools")
    csub = sp.add_subparsers(dest="config_command", required=True, metavar="SUBCOMMAND")
    cp = csub.add_parser("check", help="validate a config file: exit 0 if usable, 2 with one line per problem")
    cp.add_argument("file", type=Path)
    cp.set_defaults(func=cmd_config_check)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except UsageError as exc:
        print(f"agent-ctl: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except CtlError as exc:
        print(f"agent-ctl: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        return EXIT_FAILED


if __name__ == "__main__":
    # Run the imported module, not __main__: agent.ctl_deploy raises agent.ctl's exception classes.
    from agent.ctl import main as _main

    sys.exit(_main())
