"""The deployment state machine: received → downloading → verifying → validating → activating → active.

Or rejected (bad manifest, signature, size), failed (hash, load, validation, timeout), rolled_back
(activated, then failed probation or was rolled back by command). The running model is not touched
until the new one has passed validation in a child process and has been loaded and warmed here.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import queue
import shutil
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import yaml

from agent.config import AgentConfig
from agent.deploy.journal import Journal
from agent.deploy.manifest import (
    DeploymentManifest,
    ManifestRejected,
    MqttSource,
    check_signature,
    load_public_key,
    parse_manifest,
)
from agent.deploy.store import ModelStore, StoredModel
from agent.deploy.transfer import ChunkReceiver, TransferError, TransferStopped, download_url
from agent.deploy.validate import BACKGROUND_NICE, ValidationFailed, validate_in_child
from agent.inference.loaded import LoadedModel
from agent.inference.modelfile import file_sha256
from agent.messaging.topics import Topics
from agent.runtimes import detect_format
from agent.stats import percentile
from agent.threads import name_this_thread, nice_this_thread
from agent.vocab import is_safe_id

log = logging.getLogger(__name__)
PROBATION_MIN_FRAMES = 30
PROBATION_MIN_EXTRA_MS = 5.0

class Interrupted(Exception):
    """The agent is stopping mid-deployment: not an outcome, so not journaled; it resumes after restart."""


@dataclass
class Probation:
    deployment_id: str
    until: float
    previous: LoadedModel
    baseline_p95: float  # 0.0 when no frame ran before the swap
    processed_at_swap: int
    errors_at_swap: int


class Deployer:
    """Runs deployments one at a time on its own thread; MQTT callbacks only enqueue."""

    def __init__(self, cfg: AgentConfig, *, topics: Topics, publish: Callable[..., bool], store: ModelStore,
                 load: Callable[[Path], LoadedModel], activate: Callable[[LoadedModel], LoadedModel],
                 pipeline_stats, current_model: Callable[[], LoadedModel]):
        self.cfg = cfg
        self.topics = topics
        self.publish = publish
        self.store = store
        self.load = load
        self.activate_model = activate  # swaps into the pipeline at a frame boundary, returns the old one
        self.stats = pipeline_stats
        self.current_model = current_model
        state_dir = cfg.state_dir
        self.journal = Journal(state_dir / "deployments.jsonl")
        self.staging = state_dir / "staging"
        self.trusted = [load_public_key(k) for k in cfg.deploy.trusted_keys]
        self.probation_s = cfg.deploy.probation_s
        self._jobs: queue.Queue = queue.Queue(maxsize=1000)
        self._receivers: dict[str, ChunkReceiver] = {}
        self._probation: Probation | None = None
        self._stop = threading.Event()
        # Set when a newer manifest arrives while one is downloading: the desired model changed, so the
        # old transfer (perhaps waiting for a sender that is long gone) gives way at once.
        self._abort = threading.Event()
        self._downloading: str | None = None
        self._thread = threading.Thread(target=self._run, name="deployer", daemon=True)
        # Models are loaded on a thread at normal priority: the runtime's worker threads (ORT's intra-op
        # pool, XNNPACK's) are created by the loading thread and inherit its niceness, and they go on
        # serving every frame after the swap. The deployer itself runs niced (hashing, validation).
        self._loader = ThreadPoolExecutor(max_workers=1, initializer=name_this_thread, initargs=("ea-loader",))
        self.last_deployment: str | None = None

    # -- wiring ----------------------------------------------------------------------------------
    def subscriptions(self) -> list[tuple[str, int]]:
        own = [self.topics.deploy, f"{self.topics.deploy}/+/chunk/+"]
        groups = [t for g in self.cfg.groups for t in (self.topics.group_deploy(g), f"{self.topics.group_deploy(g)}/+/chunk/+")]
        return [(t, 1) for t in own + groups]

    def start(self) -> None:
        self._loader.submit(lambda: None).result()  # its thread starts now, from this (un-niced) thread
        self._thread.start()

    def _load(self, path: Path) -> LoadedModel:
        return self._loader.submit(self.load, path).result()

    def stop(self) -> None:
        self._stop.set()
        self._abort.set()
        self._jobs.put(None)
        self._thread.join(5)
        self._loader.shutdown(wait=False)
        for r in self._receivers.values():
            r.close()

    def on_message(self, topic: str, payload: bytes, retain: bool) -> bool:
        """Route a deploy-family message; False if the topic is not ours to handle."""
        base, _, rest = topic.partition("/deploy")
        if f"{base}/deploy" not in (self.topics.deploy, *(self.topics.group_deploy(g) for g in self.cfg.groups)):
            return False
        if rest == "":
            if payload and self._downloading is not None and _raw_id(payload) not in (None, self._downloading):
                self._abort.set()
            self._enqueue(("manifest", topic, payload))
            return True
        parts = rest.split("/")  # "", id, "chunk", i
        if len(parts) == 4 and parts[2] == "chunk":
            receiver = self._receivers.get(parts[1])
            if receiver is not None and parts[3].isdigit():
                receiver.write(int(parts[3]), payload)
            return True
        return False

    def request(self, command: str, reply: Callable[[dict], None]) -> None:
        """A cmd-topic request handled on the deployer thread, in order with deployments."""
        self._enqueue(("command", command, reply))

    def _enqueue(self, job) -> None:
        try:
            self._jobs.put_nowait(job)
        except queue.Full:
            log.warning("deployer: too many pending requests; dropped %s", job[0])

    # -- events ----------------------------------------------------------------------------------
    def _event(self, deployment_id: str | None, state: str, *, error: str | None = None,
               progress: float | None = None, **extra) -> None:
        payload = {"deployment_id": deployment_id, "state": state, "progress": progress, "error": error,
                   "ts": time.time(), **extra}
        self.publish(self.topics.events, json.dumps(payload).encode(), qos=1)
        # Journal each state once (not every progress report), so a restart knows where it was.
        if deployment_id and "need" not in extra and (state != "downloading" or progress == 0.0):
            self.journal.record(deployment_id, state, error)
        if state in ("rejected", "failed", "rolled_back"):
            log.warning("deployment %s %s: %s", deployment_id, state, error)
        else:
            log.info("deployment %s: %s%s", deployment_id, state, f" ({progress:.0%})" if progress is not None else "")

    # -- the thread --------------------------------------------------------------------------------
    def _run(self) -> None:
        name_this_thread("ea-deployer")
        nice_this_thread(BACKGROUND_NICE)  # hashing and loading a new model must not take the frame loop's CPU
        while not self._stop.is_set():
            try:
                job = self._jobs.get(timeout=0.25)
            except queue.Empty:
                job = False
            if job is None:
                break
            try:
                if job:
                    if job[0] == "manifest":
                        self._handle_manifest(job[1], job[2])
                    elif job[0] == "command":
                        self._handle_command(job[1], job[2])
                self._check_probation()
            except Exception:  # noqa: BLE001 - the deployer must outlive any single bad job
                log.exception("deployer: unexpected error")

    def _handle_manifest(self, topic: str, payload: bytes) -> None:
        if not payload:
            return  # a cleared retained manifest
        try:
            raw, manifest = parse_manifest(payload)
        except ManifestRejected as exc:
            did = _raw_id(payload)
            key = did or "payload-" + hashlib.sha256(payload).hexdigest()[:16]
            if not self.journal.finished(key):
                self._event(did, "rejected", error=str(exc))
                if did is None:
                    self.journal.record(key, "rejected", str(exc))
            return
        did = manifest.deployment_id
        if self.journal.finished(did):
            log.debug("deployment %s already %s; not applied again", did, self.journal.state(did))
            return
        self.last_deployment = did
        resumed = self.journal.state(did) is not None
        self._event(did, "received", resumed=resumed, model={"name": manifest.model.name,
                                                            "version": manifest.model.version})
        try:
            self._deploy(raw, manifest)
        except Interrupted:
            log.info("deployment %s interrupted by shutdown; it resumes when the agent starts again", did)
        except ManifestRejected as exc:
            self._event(did, "rejected", error=str(exc))
        except (TransferError, ValidationFailed, OSError, ValueError, RuntimeError) as exc:
            self._event(did, "failed", error=str(exc))
        finally:
            r = self._receivers.pop(did, None)
            if r is not None:
                r.close()

    def _deploy(self, raw: dict, m: DeploymentManifest) -> None:
        did, spec = m.deployment_id, m.model
        limit = self.cfg.deploy.max_model_mb * 2**20
        if spec.size > limit:
            raise ManifestRejected(f"model is {spec.size / 2**20:.1f} MB; this device accepts at most "
                                   f"{self.cfg.deploy.max_model_mb:g} MB (deploy.max_model_mb)")
        check_signature(raw, self.trusted)
        running = self.current_model().info
        if running.sha256 == spec.sha256 and (running.name, running.version) == (spec.name, spec.version):
            self._event(did, "active", progress=1.0, note="this model is already running")
            return
        installed = self.store.get(spec.sha256)
        if installed is None:
            staged = self._download(did, m)
            self._event(did, "verifying")
            self._verify(staged, m)
        else:
            staged = installed.path
        self._event(did, "validating")
        workdir = self.staging / f"{did}.check"
        workdir.mkdir(parents=True, exist_ok=True)
        try:
            check_path = workdir / f"model.{spec.format}"
            if check_path.exists():
                check_path.unlink()
            try:  # the child loads it from here, beside its model.yaml
                os.link(staged, check_path)
            except OSError:  # staging on another filesystem
                shutil.copyfile(staged, check_path)
            (workdir / "model.yaml").write_text(model_yaml(m))
            validate_in_child(check_path, raw, backend=self.cfg.runtime.backend,
                              accelerator=self.cfg.runtime.accelerator, timeout=self.cfg.deploy.validate_timeout_s)
        finally:
            for p in workdir.iterdir():
                p.unlink()
            workdir.rmdir()
        self._event(did, "activating")
        self._ensure_baseline()
        if self.store.get(spec.sha256) is not None:  # same bytes, maybe new name, version, labels or preprocessing
            stored = self.store.relabel(spec.sha256, _stored_manifest(m, raw), model_yaml(m))
            if installed is None:
                staged.unlink(missing_ok=True)
        else:
            stored = self.store.install(staged, spec.sha256, spec.format, _stored_manifest(m, raw), model_yaml(m))
        self._activate(did, stored)

    def _download(self, did: str, m: DeploymentManifest) -> Path:
        self._downloading = did
        self._abort.clear()
        try:
            return self._fetch(did, m)
        finally:
            self._downloading = None

    def _fetch(self, did: str, m: DeploymentManifest) -> Path:
        spec = m.model
        self._event(did, "downloading", progress=0.0)
        if isinstance(m.source, MqttSource):
            r = ChunkReceiver(self.staging, did, m.source.chunks, m.source.chunk_size, spec.size)
            self._receivers[did] = r
            if r.resumed:
                log.info("deployment %s: resuming with %d of %d chunks on disk", did, r.resumed, r.chunks)
            deadline = time.monotonic() + self.cfg.deploy.download_timeout_s
            last_report = last_need = 0.0
            while not r.complete:
                if self._stop.is_set():
                    raise Interrupted
                if self._abort.is_set():
                    raise TransferError("superseded by a newer deployment")
                now = time.monotonic()
                if now > deadline:
                    raise TransferError(f"download timed out after {self.cfg.deploy.download_timeout_s:g} s with "
                                        f"{r.received} of {r.chunks} chunks")
                # Ask for what is missing when nothing came for a while (chunks lost, sender restarted, late joiner).
                if now - r.last_progress > 1.0 and now - last_need > 1.0:
                    self._event(did, "downloading", progress=r.progress, need=r.missing(500))
                    last_need = now
                elif now - last_report > 0.5:
                    self._event(did, "downloading", progress=r.progress)
                    last_report = now
                r.wait(0.2)
            r.close()
            self._event(did, "downloading", progress=1.0)
            return r.part
        dest = self.staging / f"{did}.part"
        self.staging.mkdir(parents=True, exist_ok=True)
        last = [0.0]

        def progress(p: float) -> None:
            if time.monotonic() - last[0] > 0.5 or p >= 1.0:
                last[0] = time.monotonic()
                self._event(did, "downloading", progress=round(p, 4))

        try:
            download_url(m.source.url, dest, spec.size, progress=progress, stop=self._abort)
        except TransferStopped:
            if self._stop.is_set():
                raise Interrupted from None
            raise TransferError("superseded by a newer deployment") from None
        return dest

    def _verify(self, staged: Path, m: DeploymentManifest) -> None:
        spec = m.model
        size = staged.stat().st_size
        if size != spec.size:
            raise TransferError(f"staged file has {size} bytes, the manifest says {spec.size}")
        digest = file_sha256(staged)
        if digest != spec.sha256:
            staged.unlink(missing_ok=True)  # a resumed transfer must not keep bad bytes
            (staged.parent / f"{m.deployment_id}.have").unlink(missing_ok=True)
            raise TransferError(f"sha256 mismatch: got {digest[:12]}…, the manifest says {spec.sha256[:12]}…")
        try:
            fmt = detect_format(staged)
        except ValueError as exc:
            raise ManifestRejected(f"not a model file: {exc}") from None
        if fmt != spec.format:
            raise ManifestRejected(f"the file is a {fmt} model; the manifest says {spec.format}")

    def _ensure_baseline(self) -> None:
        """Put the model running now into the store, so the first deployment has something to roll back to."""
        if self.store.active() is not None:
            return
        current = self.current_model().info
        path = Path(current.path)
        manifest = {"name": current.name, "version": current.version, "format": current.format,
                    "task": current.task, "sha256": current.sha256, "origin": "configured"}
        yaml_text = None
        for candidate in (path.with_suffix(".yaml"), path.parent / "model.yaml"):
            if candidate.is_file():
                yaml_text = candidate.read_text()
                break
        tmp = self.staging / f"baseline-{current.sha256[:12]}"
        tmp.write_bytes(path.read_bytes())
        stored = self.store.install(tmp, current.sha256, current.format, manifest, yaml_text)
        self.store.activate(stored.sha256)

    def _activate(self, did: str, stored: StoredModel) -> None:
        new = self._load(stored.path)  # loaded and warmed while the old model keeps serving
        baseline = percentile(self.stats.inference_ms, 95)
        errors_before = self.stats.errors
        processed_before = self.stats.processed
        old = self.activate_model(new)
        self.store.activate(stored.sha256)
        self._end_probation(keep_previous=False)
        self._probation = Probation(did, time.monotonic() + self.probation_s, old, baseline,
                                    processed_before, errors_before)
        self._event(did, "active", progress=1.0, model={"name": stored.name, "version": stored.version,
                                                       "sha256": stored.sha256})

    # -- probation and rollback ---------------------------------------------------------------------
    def _check_probation(self) -> None:
        p = self._probation
        if p is None:
            return
        stats = self.stats
        errors = stats.errors - p.errors_at_swap
        n_new = stats.processed - p.processed_at_swap
        reason = None
        if errors >= 3:
            reason = f"{errors} inference errors during probation (last: {stats.last_error})"
        elif p.baseline_p95 and n_new >= PROBATION_MIN_FRAMES:
            recent = list(stats.inference_ms)[-min(n_new, len(stats.inference_ms)):]
            p95 = percentile(recent, 95)
            # 3x, and a few ms more: on a loaded machine a 2 ms model can briefly read 6 ms.
            if p95 and p95 > 3 * p.baseline_p95 and p95 > p.baseline_p95 + PROBATION_MIN_EXTRA_MS:
                reason = f"inference p95 {p95:.1f} ms is over 3x the previous model's {p.baseline_p95:.1f} ms"
        if reason:
            self._rollback(p.deployment_id, reason)
        elif time.monotonic() >= p.until:
            log.info("deployment %s passed probation (%d frames, %d errors)", p.deployment_id, n_new, errors)
            self._end_probation(keep_previous=False)

    def _end_probation(self, keep_previous: bool) -> None:
        p, self._probation = self._probation, None
        if p is not None and not keep_previous:
            p.previous.close()

    def _rollback(self, deployment_id: str | None, reason: str) -> StoredModel:
        p = self._probation
        target = self.store.previous()
        if target is None:
            raise RuntimeError("no previous version to roll back to")
        if p is not None and p.previous.info.sha256 == target.sha256:
            previous = p.previous  # still loaded: the swap back is instant
            self._probation = None
        else:
            self._end_probation(keep_previous=False)
            previous = self._load(target.path)
        old = self.activate_model(previous)
        old.close()
        self.store.rollback()
        self._event(deployment_id, "rolled_back", error=reason,
                    model={"name": target.name, "version": target.version, "sha256": target.sha256})
        return target

    def _handle_command(self, command: str, reply: Callable[[dict], None]) -> None:
        if command == "rollback":
            try:
                did = self._probation.deployment_id if self._probation else self.last_deployment
                target = self._rollback(did, "rolled back by command")
                reply({"ok": True, "error": None, "model": {"name": target.name, "version": target.version,
                                                            "sha256": target.sha256}})
            except (RuntimeError, OSError) as exc:
                reply({"ok": False, "error": str(exc)})
        elif command == "models":
            models = [{"name": s.name, "version": s.version, "sha256": s.sha256, "format": s.manifest.get("format"),
                       "task": s.manifest.get("task"), "active": active} for s, active in self.store.list()]
            if not models:
                info = self.current_model().info
                models = [{**info.to_json(), "active": True, "origin": "configured"}]
            reply({"ok": True, "error": None, "models": models, "deployments": self.journal.latest(10)})


def model_yaml(m: DeploymentManifest) -> str:
    """The model.yaml stored beside a deployed model, so the loader finds its task, labels and preprocess."""
    doc: dict = {"name": m.model.name, "version": m.model.version, "task": m.model.task}
    if m.model.labels:
        doc["labels"] = m.model.labels
    if m.model.preprocess:
        doc["preprocess"] = m.model.preprocess.model_dump(mode="json", exclude_unset=True)
    if m.model.decode:
        doc["decode"] = m.model.decode.model_dump(mode="json", exclude_unset=True)
    return yaml.safe_dump(doc, sort_keys=False)


def _stored_manifest(m: DeploymentManifest, raw: dict) -> dict:
    return {"deployment_id": m.deployment_id, **m.model.model_dump(exclude={"labels"}), "installed": time.time(),
            "signed": bool(raw.get("signature"))}


def _raw_id(payload: bytes) -> str | None:
    try:
        did = json.loads(payload).get("deployment_id")
    except (ValueError, AttributeError, UnicodeDecodeError):
        return None
    return did if is_safe_id(did) else None

