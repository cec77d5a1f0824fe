"""The composition root: builds the parts from config, wires them, and runs the main loop (readiness,
watchdog, health, reload, shutdown)."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import threading
import time
from pathlib import Path

import paho.mqtt.client as paho

from agent.camera import Capture, FrameSlot, make_source
from agent.config import AgentConfig, ConfigError, load_config
from agent.daemon.commands import Commands, SignedCommands
from agent.daemon.health import HealthSampler, OutboxHealth
from agent.daemon.spinning import Respinner
from agent.daemon.status import device_status, snapshot, snapshot_jpeg
from agent.daemon.systemd import Notifier
from agent.daemon.webhooks import AgentBackend
from agent.deploy.deployer import Deployer
from agent.deploy.store import ModelStore
from agent.inference.loaded import LoadedModel
from agent.inference.loader import load_checked, load_model
from agent.inference.pipeline import Pipeline
from agent.inference.spin import SpinPolicy
from agent.messaging.delivery import DurableSender
from agent.messaging.homeassistant import HomeAssistant
from agent.messaging.link import MqttLink
from agent.messaging.outbox import Outbox, OutboxError
from agent.messaging.payloads import CommandReply, dumps
from agent.messaging.publisher import PredictionPublisher
from agent.messaging.topics import Topics
from agent.runtimes import RuntimeChoice, inference_threads
from agent.runtimes.choice import chooser, probe

log = logging.getLogger("agent")


class Agent:
    """Everything the daemon runs, built from one AgentConfig."""

    def __init__(self, cfg: AgentConfig, config_path: Path | None = None):
        self.cfg = cfg
        self.config_path = config_path
        self.ha: HomeAssistant | None = None
        self.spin = SpinPolicy(cfg.runtime.spin)
        self._swap_lock = threading.Lock()
        self.notifier = Notifier()
        self.topics = Topics(cfg.mqtt.prefix, cfg.device_id)
        _require_state_dir(cfg.state_dir)
        self.facts = probe(check_runtimes="first")
        self.store = ModelStore(cfg.state_dir / "models", keep=cfg.deploy.keep_versions)
        self.model = self._initial_model()
        self.spin.set_applies(spin_applies(self.model))
        self.respinner = Respinner(self, self.spin)
        self.source = make_source(cfg.camera, base=config_path.parent if config_path else None)
        self.slot = FrameSlot()
        self.capture = Capture(self.source, self.slot, fps=cfg.camera.fps, stall_s=cfg.camera.stall_s)
        self.link = MqttLink(
            cfg.mqtt, client_id=cfg.mqtt.client_id or f"edge-agent-{cfg.device_id}",
            will=(self.topics.status, dumps({"state": "offline"})),
            subscriptions=(),
            on_connect=self._on_connect, on_message=self.on_message,
        )
        self.link.client.max_queued_messages_set(1000)
        self.durable = DurableSender(self.link, self._open_outbox(cfg), rate=cfg.mqtt.outbox_rate)
        self.publisher = PredictionPublisher(self.link, self.topics.predictions, cfg.mqtt.predictions_qos,
                                             durable=self.durable)
        self.pipeline = Pipeline(self.slot, self.model, self.publisher.submit)
        self.publisher.finish = self.pipeline.finish  # outputs are decoded on the publisher's thread
        self.capture.prepare = self.pipeline.prepare
        self.deployer = Deployer(cfg, topics=self.topics, publish=self._publish_event, store=self.store,
                                 load=lambda path: self._load(path), activate=self._swap,
                                 pipeline_stats=self.pipeline.stats, current_model=lambda: self.model)
        self.link.subscriptions = ((self.topics.cmd, 1), *self.deployer.subscriptions())
        self.commands = Commands(respond=self._respond, deployer_request=self.deployer.request, handlers={
            "reload": self._reload_command,
            "status": lambda: CommandReply(True, result={"status": self.status_payload()}),
            "snapshot": lambda: CommandReply(True, result=snapshot(self.pipeline.last_frame)),
        }, signed=SignedCommands(cfg.device_id, lambda: self.deployer.trusted))
        self.health = HealthSampler(state_dir=cfg.state_dir if cfg.state_dir.exists() else None)
        self.web_backend = AgentBackend(self)
        self.web = self._web_server(cfg)
        self.ha = self._home_assistant(cfg)
        self._stop = threading.Event()
        self._reload = threading.Event()

    # -- building -------------------------------------------------------------------------------
    def _web_server(self, cfg: AgentConfig):
        if not cfg.http.listen:
            return None
        from agent.web.server import WebServer  # aiohttp is imported only when the server is on

        return WebServer(cfg.http, self.web_backend)

    def _home_assistant(self, cfg: AgentConfig) -> HomeAssistant | None:
        if not cfg.homeassistant.enabled:
            return None
        ha = HomeAssistant(self.topics, cfg.homeassistant.prefix,
                           lambda topic, payload, retain: self.durable.submit(topic, payload, qos=1, retain=retain,
                                                                              control=True),
                           platform_model=self.facts.model, has_temperature=bool(self.health.zones),
                           installed=lambda: self.model.info.version)
        self.link.subscriptions = (*self.link.subscriptions, *ha.subscriptions)
        self.publisher.observe = lambda pred: ha.on_prediction(pred.results)
        return ha

    def _open_outbox(self, cfg: AgentConfig) -> Outbox | None:
        try:
            return Outbox(cfg.state_dir / "outbox.db", max_mb=cfg.mqtt.outbox_max_mb)
        except (OutboxError, OSError) as exc:
            log.error("no durable outbox (%s): QoS 1 messages are kept in memory only", exc)
            return None

    def _publish_event(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> bool:
        self.durable.submit(topic, payload, qos=qos, retain=retain, control=True)
        if topic == self.topics.events:
            event = json.loads(payload)
            self.respinner.on_event(event)
            if self.ha is not None:
                self.ha.on_event(event)
        return True

    def _initial_model(self) -> LoadedModel:
        """The last model activated in the store; the configured one when the store is empty or unusable.

        Each is loaded in a child first (``load_checked``): a runtime that crashes there falls back to
        its safe mode instead of taking the daemon down at every restart.
        """
        stored = self.store.active()
        if stored is not None:
            try:
                return self._load(stored.path, trial=True)
            except Exception as exc:  # noqa: BLE001 - a bad store must not keep the device down
                log.error("stored model %s %s does not load (%s); using the configured model",
                          stored.name, stored.version, exc)
        return self._load(self.cfg.model.path, configured=True, trial=True)

    def _load(self, path: Path, configured: bool = False, cfg: AgentConfig | None = None,
              trial: bool = False) -> LoadedModel:
        """Load a model on the backend the probe picks; config task/labels/threshold apply to the configured one."""
        cfg = cfg or self.cfg
        pick = chooser(self.facts, path, cfg.runtime.backend, cfg.runtime.accelerator)

        def choose(fmt: str) -> RuntimeChoice:
            choice = dataclasses.replace(pick(fmt), spin=self.spin.load_spinning())
            log.info("runtime: %s", choice.reason)
            return choice

        threads = inference_threads(cfg.runtime.threads)
        extra = dict(task=cfg.model.task, labels_file=cfg.model.labels, threshold=cfg.model.threshold) if configured else {}
        cache_dir = cfg.state_dir / "cache" if _writable(cfg.state_dir) else None
        return (load_checked if trial else load_model)(path, choose, threads=threads, cache_dir=cache_dir, **extra)

    def _swap(self, new: LoadedModel) -> LoadedModel:
        """Make ``new`` the serving model between two frames; returns the old one, still open."""
        with self._swap_lock:
            old = self.pipeline.swap(new)
            self.model = new
            self.spin.set_applies(spin_applies(new))
            self.spin.model_changed(spinning=bool(new.choice and new.choice.spin))
        self.publish_status()
        if self.ha is not None:
            self.ha.publish_update()
        return old

    def swap_if_current(self, base: LoadedModel, new: LoadedModel) -> bool:
        """Swap ``new`` (the same model reopened) in for ``base`` if ``base`` is still serving; closes ``base``."""
        with self._swap_lock:
            if self.model is not base:
                return False
            old = self.pipeline.swap(new)
            self.model = new
        old.close()
        return True

    # -- MQTT -----------------------------------------------------------------------------------
    def status_payload(self, state: str = "online") -> dict:
        return device_status(state, device_id=self.cfg.device_id, groups=self.cfg.groups,
                             boot_id=self.pipeline.boot_id, facts=self.facts, model=self.model,
                             camera_source=self.source.name, spin=self.spin.state.to_json()).to_json()

    def publish_status(self) -> None:
        self.link.publish(self.topics.status, dumps(self.status_payload()), qos=1, retain=True)

    def _on_connect(self) -> None:
        self.publish_status()
        if self.ha is not None:
            self.ha.announce()

    def on_message(self, msg: paho.MQTTMessage) -> None:
        if msg.topic == self.topics.cmd:
            self.commands.on_message(msg.topic, msg.payload, bool(msg.retain))
        elif self.ha is not None and self.ha.on_message(msg.topic, msg.payload):
            pass
        elif not self.deployer.on_message(msg.topic, msg.payload, bool(msg.retain)):
            log.debug("ignoring a message on %s", msg.topic)

    def _respond(self, response: dict) -> None:
        payload = dumps(response)
        if not self.link.fits(self.topics.cmd_response, payload):  # e.g. a snapshot: say so instead of nothing
            payload = dumps(CommandReply.failed(
                f"the reply is {len(payload)} bytes; the broker takes at most {self.link.max_packet} (its maximum "
                "packet size)").to_json(response.get("request_id")))
        self.link.publish(self.topics.cmd_response, payload, qos=1)

    # -- running --------------------------------------------------------------------------------
    def run(self) -> int:
        self.capture.start()
        self.durable.start()
        self.deployer.start()
        self.link.start()
        self.publisher.start()
        self.pipeline.start()
        if self.web is not None:
            self.web.start()
        log.info("publishing predictions to %s on %s (watch: agent-ctl watch, or mosquitto_sub -t '%s/#' -v)",
                 self.topics.predictions, self.link.endpoint, self.topics.prefix)
        try:
            self._loop()
        except Exception:  # noqa: BLE001 - never a half-alive process: say offline, stop, exit non-zero
            log.exception("main loop failed; stopping")
            self.shutdown()
            return 1
        return self.shutdown()

    def _loop(self) -> None:
        ready = False
        interval = self.cfg.health.interval_s
        next_health = time.monotonic() + min(interval, 2.0)
        next_ping = time.monotonic()
        next_spin = next_ping + 1.0
        while not self._stop.is_set():
            now = time.monotonic()
            if not ready and self.pipeline.wait_first_frame(0):
                ready = True
                self.notifier.ready(self._status_line())
                log.info("ready: first frame inferred")
            wd = self.notifier.watchdog_interval
            # Ping only while the frame loop turns: a hung runtime stops the pings and systemd restarts us.
            if wd and now >= next_ping and self.pipeline.alive(within_s=max(wd * 2, 5.0)):
                self.notifier.watchdog()
                next_ping = now + wd
            if now >= next_spin:
                self.respinner.tick(now)
                next_spin = now + 1.0
            if now >= next_health:
                try:
                    self._publish_health()
                except OSError as exc:  # e.g. out of file descriptors for a moment: the next sample may work
                    log.error("health sample failed (%s); frames are still served", exc)
                next_health = now + self.cfg.health.interval_s
            if self._reload.is_set():
                self._reload.clear()
                self.reload()
            # Until ready, look often; then wake only for what is due (at most 1 s: SIGHUP's reload flag).
            # A ping held back by a stalled frame loop is looked at again in 0.2 s, as before.
            ping_due = (next_ping if next_ping > now else now + 0.2) if wd else now + 1.0
            due = min(next_health, ping_due, next_spin, now + 1.0)
            self._stop.wait(0.05 if not ready else max(0.01, due - time.monotonic()))

    def _status_line(self) -> str:
        h = self.pipeline.stats
        return (f"model {self.model.info.name} {self.model.info.version} on {self.model.session.info.backend}/"
                f"{self.model.session.info.accelerator}; broker {self.link.state}"
                + (f" ({self.link.last_error})" if self.link.last_error and not self.link.connected else "")
                + f"; {h.processed} frames")

    def _publish_health(self) -> None:
        health = self.health.sample(pipeline=self.pipeline, capture=self.capture, slot=self.slot, mqtt=self.link,
                                    model_info=self.model.info, outbox_depth=self.durable.depth)
        health.outbox = OutboxHealth(health.outbox_depth, self.durable.dropped, self.durable.last_error,
                                     self.publisher.dropped, self.durable.memory_only)
        health.notify_missed = self.notifier.missed
        sample = health.to_json()
        self.web_backend.remember(sample)
        self.durable.submit(self.topics.health, dumps(sample), qos=1, retain=True, control=True)
        if self.ha is not None and (frame := self.pipeline.last_frame) is not None:
            self.ha.publish_image(snapshot_jpeg(frame))
        self.notifier.status(f"{health.fps:.1f} fps; " + self._status_line())

    def reload(self) -> None:
        """SIGHUP: re-read the config and apply what can change live (log level, health, deploy, model);
        the rest is named in the log as needing a restart."""
        self.notifier.reloading()
        try:
            new = load_config(self.config_path)
        except ConfigError as exc:
            log.error("reload: config not applied: %s", exc)
        else:
            logging.getLogger().setLevel(new.log_level.upper())
            self.cfg.health.interval_s = new.health.interval_s
            if new.deploy != self.cfg.deploy:  # trusted keys first of all: security applies at once
                try:
                    self.deployer.reconfigure(new.deploy)
                except ValueError as exc:
                    log.error("reload: deploy settings not applied: %s", exc)
            if stale := _needs_restart(self.cfg, new):
                log.warning("reload: %s changed; %s after a restart (systemctl restart edge-agent)",
                            ", ".join(stale), "it applies" if len(stale) == 1 else "they apply")
            if new.model != self.cfg.model or new.runtime != self.cfg.runtime:
                if new.runtime.spin != self.cfg.runtime.spin:
                    self.spin.reset(new.runtime.spin)
                # Only the runtime changed: the model serving now (a deployed one, perhaps) is reopened
                # with it; a changed model section loads the configured model, as it says.
                serving = Path(self.model.info.path)
                path = new.model.path if new.model != self.cfg.model else serving
                try:
                    model = self._load(path, configured=path == self.cfg.model.path or new.model != self.cfg.model,
                                       cfg=new)
                except Exception as exc:  # noqa: BLE001 - keep serving the old model
                    log.error("reload: new model not loaded, keeping the current one: %s", exc)
                else:
                    self._swap(model).close()
                    self.cfg.model, self.cfg.runtime = new.model, new.runtime
            log.info("reload: configuration re-read")
        self.notifier.ready(self._status_line())

    def stop(self) -> None:
        self._stop.set()

    def request_reload(self) -> None:
        """Re-read the config on the main loop (SIGHUP, the reload command)."""
        self._reload.set()

    def _reload_command(self) -> CommandReply:
        self.request_reload()
        return CommandReply(True)

    def shutdown(self) -> int:
        t0 = time.monotonic()
        self.notifier.stopping()
        if self.web is not None:
            self.web.stop()
        self.capture.stop()
        self.deployer.stop()
        self.pipeline.stop()
        self.publisher.stop()
        self.durable.stop()
        self.link.stop(final=(self.topics.status, dumps({**self.status_payload("offline")})))
        self.model.close()
        log.info("stopped in %.2f s", time.monotonic() - t0)
        return 0


LIVE_KEYS = ("log_level", "health.", "deploy.", "model.", "runtime.")  # what reload applies


def _needs_restart(old: AgentConfig, new: AgentConfig) -> list[str]:
    """The keys (``section.key``) that differ between ``old`` and ``new`` and that reload cannot apply."""
    def flat(cfg: AgentConfig) -> dict[str, object]:
        out: dict[str, object] = {}
        for key, value in cfg.model_dump().items():
            if isinstance(value, dict):
                out.update({f"{key}.{k}": v for k, v in value.items()})
            else:
                out[key] = value
        return out

    a, b = flat(old), flat(new)
    return [k for k in sorted(a.keys() | b.keys()) if a.get(k) != b.get(k) and not k.startswith(LIVE_KEYS)]


def spin_applies(model: LoadedModel) -> bool:
    """The spin-wait setting exists for onnxruntime's CPU provider (GPU providers: reopening costs an engine build)."""
    return model.session.info.backend == "onnxruntime" and model.session.info.accelerator == "cpu"


def _require_state_dir(path: Path) -> None:
    """Everything durable lives here: a directory this user cannot write is a start-up error, said plainly."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ValueError(f"state_dir {path}: cannot create it ({exc.strerror}); set state_dir in the config "
                         "(or EDGE_AGENT__STATE_DIR) to a directory this user can write") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise ValueError(f"state_dir {path}: not writable by this user; set state_dir in the config "
                         "(or EDGE_AGENT__STATE_DIR) to a directory this user can write") from None


def _writable(path: Path) -> bool:
    try:
        path.mkdir(parents=True, exist_ok=True)
        return os.access(path, os.W_OK)
    except OSError:
        return False
