"""agent-ctl status and agent-ctl watch: what the fleet says on the broker."""

from __future__ import annotations

import json
import sys
import threading
import time

import paho.mqtt.client as paho

from agent.config import AgentConfig
from agent.ctl.args import COUNT, SECONDS_OR_ZERO
from agent.ctl.client import MqttSession, ctl_config, json_object
from agent.ctl.errors import EXIT_FAILED, EXIT_OK
from agent.messaging.topics import device_of


def collect_status(cfg: AgentConfig, device: str | None, wait: float) -> dict[str, dict]:
    """Retained status and health of one device or all, gathered for ``wait`` seconds."""
    prefix = cfg.mqtt.prefix
    found: dict[str, dict] = {}
    lock = threading.Lock()

    def on_msg(msg: paho.MQTTMessage) -> None:
        dev = device_of(msg.topic, prefix)
        data = json_object(msg)
        if dev is None or data is None:
            return
        with lock:
            found.setdefault(dev, {})[msg.topic.rsplit("/", 1)[1]] = data

    s = MqttSession(cfg)
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
    cfg = ctl_config(args)
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
    cfg = ctl_config(args)
    prefix = cfg.mqtt.prefix
    done = threading.Event()
    seen = 0

    def on_msg(msg: paho.MQTTMessage) -> None:
        nonlocal seen
        p = json_object(msg)
        if p is None or done.is_set():
            return
        dev = device_of(msg.topic, prefix) or "?"
        print(json.dumps({"device": dev, **p}) if args.json else format_prediction(dev, p), flush=True)
        seen += 1
        if args.count and seen >= args.count:
            done.set()

    s = MqttSession(cfg)
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


def add_parsers(sub) -> None:
    sp = sub.add_parser("status", help="status and last health of one device or all")
    sp.add_argument("--device", help="device id (default: all devices)")
    sp.add_argument("--json", action="store_true")
    sp.add_argument("--wait", type=SECONDS_OR_ZERO, default=1.0, help="seconds to gather retained messages (default 1)")
    sp.set_defaults(func=cmd_status)

    sp = sub.add_parser("watch", help="print live predictions")
    sp.add_argument("--device", help="device id (default: all devices)")
    sp.add_argument("--json", action="store_true", help="one JSON object per line")
    sp.add_argument("--count", type=COUNT, default=0, help="stop after N predictions (exit 1 if fewer came)")
    sp.add_argument("--seconds", type=SECONDS_OR_ZERO, default=0, help="stop after S seconds")
    sp.set_defaults(func=cmd_watch)
