"""The agent as the HTTP server sees it (agent/web/backend.py's WebBackend), and the health it remembers.

Every method reads what the parts already count or keep; requests that need the model run on the
frame loop between frames (``Pipeline.run_aside``), commands go through the same paths as on MQTT.
"""

from __future__ import annotations

import threading
import time
from collections import deque

import numpy as np
import psutil

from agent.camera import Frame
from agent.hardware import sensors
from agent.inference.pipeline import INFERENCE_BUCKETS_MS, Prediction
from agent.messaging.payloads import CommandReply
from agent.web.backend import Counters

HISTORY = 360  # health samples kept for the page's charts (an hour at the default 10 s)
PLATFORMS = {"tflite": "tflite", "onnxruntime": "onnxruntime_onnx"}


class AgentBackend:
    def __init__(self, agent):
        self.agent = agent
        self.device_id = agent.cfg.device_id
        self.history: deque[dict] = deque(maxlen=HISTORY)
        self._proc = psutil.Process()

    # -- what the agent tells it ------------------------------------------------------------------
    def remember(self, health: dict) -> None:
        self.history.append(health)

    # -- WebBackend -------------------------------------------------------------------------------
    def status(self) -> dict:
        return self.agent.status_payload()

    def health(self) -> dict | None:
        return self.history[-1] if self.history else None

    def health_history(self) -> list[dict]:
        return list(self.history)

    def command(self, name: str, args: dict, timeout: float) -> CommandReply:
        if name == "reload":
            self.agent.request_reload()
            return CommandReply(True)
        done = threading.Event()
        box: list[CommandReply] = []

        def reply(r: CommandReply) -> None:
            box.append(r)
            done.set()

        self.agent.deployer.request(name, reply, args)
        if not done.wait(timeout):
            return CommandReply.failed(f"the deployer did not answer within {timeout:.0f} s (a deployment in progress?)")
        return box[0]

    def latest(self) -> tuple[Frame | None, Prediction | None]:
        pipeline = self.agent.pipeline
        pred = pipeline.latest
        return pipeline.frame_of(pred), pred

    def predict(self, image: np.ndarray, timeout: float) -> dict:
        def job(model):
            results, timings = model.infer(image)
            return model, results, timings

        model, results, timings = self.agent.pipeline.run_aside(job, timeout)
        h, w = image.shape[:2]
        return {"model": model.info.brief(), "task": model.info.task, "width": w, "height": h,
                "latency_ms": timings.to_json(), "results": [r.to_json() for r in results]}

    def model_io(self):
        model = self.agent.pipeline.model
        info = {"name": model.info.name, "version": model.info.version,
                "platform": PLATFORMS.get(model.session.info.backend, model.session.info.backend)}
        return info, model.session.inputs, model.session.outputs

    def infer_raw(self, tensors: list[np.ndarray], timeout: float) -> list[np.ndarray]:
        return self.agent.pipeline.run_aside(lambda model: [np.array(o) for o in model.session.run(tensors)], timeout)

    def alive(self) -> bool:
        return self.agent.pipeline.alive(within_s=10.0)

    def counters(self) -> Counters:
        a = self.agent
        stats = a.pipeline.stats
        model = a.pipeline.model
        cpu = self._proc.cpu_times()
        return Counters(
            frames_captured=a.capture.captured, frames_processed=stats.processed, frames_dropped=a.slot.dropped,
            inference_errors=stats.errors, inference_buckets_ms=INFERENCE_BUCKETS_MS,
            inference_counts=list(stats.inference_counts), inference_sum_ms=stats.inference_sum_ms,
            predictions_sent=a.publisher.published, predictions_unsent=a.publisher.unsent,
            predictions_dropped=a.publisher.dropped,
            mqtt_sent=a.link.sent, mqtt_unsent=a.link.unsent, mqtt_connected=a.link.connected,
            outbox_depth=a.durable.depth, outbox_dropped=a.durable.dropped,
            deployments=a.deployer.journal.counts(),
            model={"name": model.info.name, "version": model.info.version, "sha256": model.info.sha256,
                   "backend": model.session.info.backend},
            temperatures_c=sensors.read_temperatures(zones=a.health.zones),
            cpu_seconds=cpu.user + cpu.system, rss_bytes=self._proc.memory_info().rss,
            uptime_s=time.monotonic() - a.health.started, camera_up=a.capture.state == "streaming",
        )
