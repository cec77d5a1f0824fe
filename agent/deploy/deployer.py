"""The deployment state machine: received → downloading → verifying → validating → activating → active →
committed. Or rejected (bad manifest, signature, target, expiry, counter, size), failed (hash, load,
validation, timeout), rolled_back (activated, then failed probation or rolled back by command).

The running model is not touched until the new one has passed validation in a child process and has
been loaded and warmed here. The steps are in release, download, staging and probation; this module
routes messages, queues the jobs, runs them one at a time on its own thread and says what happened.
"""

from __future__ import annotations

import hashlib
import json
import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from agent.config import AgentConfig
from agent.deploy import probation, staging
from agent.deploy.download import Interrupted, download
from agent.deploy.events import CommandJob, DeployEvent, Job, ManifestJob, ModelRef
from agent.deploy.journal import Journal
from agent.deploy.manifest import (
    MAX_MANIFEST_BYTES,
    DeploymentManifest,
    ManifestRejected,
    check_signature,
    claimed_id,
    load_public_key,
    parse_manifest,
)
from agent.deploy.release import Arrival, ReleaseCounter, check_release, supersedes
from agent.deploy.store import ModelStore, StoredModel
from agent.deploy.transfer import ChunkReceiver, TransferError
from agent.deploy.validate import BACKGROUND_NICE, ValidationFailed
from agent.inference.loaded import LoadedModel
from agent.messaging.payloads import CommandReply
from agent.messaging.topics import Topics, chunk_filter, parse_deploy_topic
from agent.support.stats import percentile
from agent.support.threads import name_this_thread, nice_this_thread
from agent.vocab import FAILED_STATES

log = logging.getLogger(__name__)
FRAME_LOOP_STUCK_S = 5.0  # after a rollback's swap, a frame loop silent this long is not serving
QUEUE_MAX_BYTES = 8 * 2**20  # what waiting jobs may hold: 1000 manifests at the 256 KiB limit would be 256 MB


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
        self.release = ReleaseCounter(state_dir / "release.json")
        self.staging = state_dir / "staging"
        self.trusted = [load_public_key(k) for k in cfg.deploy.trusted_keys]
        self.probation_record = probation.ProbationRecord(state_dir / "probation.json")
        self.deploy_topics = (topics.deploy, *(topics.group_deploy(g) for g in cfg.groups))
        self._jobs: queue.Queue[Job | None] = queue.Queue(maxsize=1000)  # None: stop
        self._queued_bytes = 0  # payload bytes of the manifests waiting in _jobs
        self._queued_lock = threading.Lock()
        self._last_too_large = 0.0
        self._receivers: dict[str, ChunkReceiver] = {}
        self._probation: probation.Probation | None = None
        self._stop = threading.Event()
        # Set when a newer manifest arrives while one is downloading: the desired model changed, so the
        # old transfer (perhaps waiting for a sender that is long gone) gives way at once.
        self._abort = threading.Event()
        self._downloading: DeploymentManifest | None = None
        self._thread = threading.Thread(target=self._run, name="deployer", daemon=True)
        # Models are loaded on a thread at normal priority: the runtime's worker threads (ORT's intra-op
        # pool, XNNPACK's) are created by the loading thread and inherit its niceness, and they go on
        # serving every frame after the swap. The deployer itself runs niced (hashing, validation).
        self._loader = ThreadPoolExecutor(max_workers=1, initializer=name_this_thread, initargs=("ea-loader",))
        self.last_deployment: str | None = None

    # -- wiring ----------------------------------------------------------------------------------
    def subscriptions(self) -> list[tuple[str, int]]:
        return [(t, 1) for base in self.deploy_topics for t in (base, chunk_filter(base))]

    def reconfigure(self, deploy) -> None:
        """Apply new deploy settings at once (a reload): trusted keys, limits, timeouts, probation.

        ValueError for a key that does not load; nothing changes then.
        """
        self.trusted = [load_public_key(k) for k in deploy.trusted_keys]
        self.store.keep = deploy.keep_versions
        self.cfg.deploy = deploy
        log.info("deploy settings applied (%d trusted key(s))", len(self.trusted))

    def start(self) -> None:
        active = self.store.active()  # a probation that a restart (or kill -9) interrupted goes on
        self._probation = self.probation_record.resume(active.sha256 if active else None, self.stats.processed,
                                                       self.stats.errors)
        if self._probation is not None:
            log.info("deployment %s: probation resumed after a restart", self._probation.deployment_id)
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
        where = parse_deploy_topic(topic, self.deploy_topics)
        if where is None:
            return False
        if where.deployment_id is None:
            if len(payload) > MAX_MANIFEST_BYTES:  # refused without keeping (or parsing) its bytes
                self._enqueue(ManifestJob(topic, b"", too_large=len(payload)))
                return True
            if payload and self._downloading is not None and self._supersedes(topic, payload):
                self._abort.set()
            self._enqueue(ManifestJob(topic, payload))
        elif (receiver := self._receivers.get(where.deployment_id)) is not None:
            receiver.write(where.chunk, payload)  # type: ignore[arg-type]
        return True

    def _arrival(self, topic: str) -> Arrival:
        group = next((g for g in self.cfg.groups if topic == self.topics.group_deploy(g)), None)
        return Arrival(self.cfg.device_id, tuple(self.cfg.groups), group)

    def _authentic(self, payload: bytes) -> tuple[dict, DeploymentManifest]:
        """The manifest if it is valid and signed as required; ManifestRejected if not."""
        raw, m = parse_manifest(payload)
        check_signature(raw, self.trusted)
        return raw, m

    def _check_release(self, m: DeploymentManifest, topic: str) -> None:
        """ManifestRejected unless an authentic ``m`` is for this device, now, and newer than what it accepted."""
        check_release(m, self._arrival(topic), signed_required=bool(self.trusted), highest=self.release.highest)

    def _supersedes(self, topic: str, payload: bytes) -> bool:
        """Whether this manifest replaces the one downloading now (see release.supersedes), once verified."""
        downloading = self._downloading
        if downloading is None:
            return False
        try:
            _, m = self._authentic(payload)
            self._check_release(m, topic)
        except ManifestRejected:
            return False
        return supersedes(m, downloading, finished=self.journal.finished)

    def request(self, command: str, reply: Callable[[CommandReply], None], args: dict | None = None) -> None:
        """A cmd-topic request handled on the deployer thread, in order with deployments."""
        self._enqueue(CommandJob(command, reply, args or {}))

    def _enqueue(self, job: Job) -> None:
        size = len(job.payload) if isinstance(job, ManifestJob) else 0
        with self._queued_lock:
            if self._queued_bytes + size > QUEUE_MAX_BYTES:
                log.warning("deployer: %d bytes of requests already waiting; dropped a %d-byte manifest",
                            self._queued_bytes, size)
                return
            try:
                self._jobs.put_nowait(job)
            except queue.Full:
                log.warning("deployer: too many pending requests; dropped a %s", type(job).__name__)
                return
            self._queued_bytes += size

    # -- events ----------------------------------------------------------------------------------
    def _report(self, event: DeployEvent, record: bool = True) -> None:
        """Publish ``event``; ``record`` journals its state too (each state once, not every progress report)."""
        self.publish(self.topics.events, json.dumps(event.to_json()).encode(), qos=1)
        if record and event.deployment_id:
            self.journal.record(event.deployment_id, event.state, event.error)
        if event.state in FAILED_STATES:
            log.warning("deployment %s %s: %s", event.deployment_id, event.state, event.error)
        else:
            log.info("deployment %s: %s%s", event.deployment_id, event.state,
                     f" ({event.progress:.0%})" if event.progress is not None else "")

    # -- the thread --------------------------------------------------------------------------------
    def _run(self) -> None:
        name_this_thread("ea-deployer")
        nice_this_thread(BACKGROUND_NICE)  # hashing and loading a new model must not take the frame loop's CPU
        while not self._stop.is_set():
            try:
                job = self._jobs.get(timeout=0.25)
            except queue.Empty:
                job = None
            else:
                if job is None:
                    break
                if isinstance(job, ManifestJob):
                    with self._queued_lock:
                        self._queued_bytes -= len(job.payload)
            try:
                if isinstance(job, ManifestJob) and job.too_large:
                    self._refuse_too_large(job.too_large)
                elif isinstance(job, ManifestJob):
                    self._handle_manifest(job.topic, job.payload)
                elif isinstance(job, CommandJob):
                    job.reply(self._handle_command(job.command, job.args))
                self._check_probation()
            except Exception:  # noqa: BLE001 - the deployer must outlive any single bad job
                log.exception("deployer: unexpected error")

    def _refuse_too_large(self, size: int) -> None:
        now = time.monotonic()
        if now - self._last_too_large >= 1.0:  # a flood of them is one event a second, not one each
            self._last_too_large = now
            self._report(DeployEvent(None, "rejected", error=f"manifest is {size} bytes; the limit is "
                                                             f"{MAX_MANIFEST_BYTES}"))

    def _handle_manifest(self, topic: str, payload: bytes) -> None:
        if not payload:
            return  # a cleared retained manifest
        try:
            raw, manifest = self._authentic(payload)
        except ManifestRejected as exc:
            # Not verified, so it speaks for nobody: journaled by its bytes, never under the id it claims
            # (a forged copy of a real manifest's id must not make the real one "already rejected").
            digest = hashlib.sha256(payload).hexdigest()[:16]
            key = "payload-" + digest
            if not self.journal.finished(key):
                self._report(DeployEvent(claimed_id(payload), "rejected", error=str(exc), manifest_sha256=digest),
                             record=False)
                self.journal.record(key, "rejected", str(exc))
            return
        did = manifest.deployment_id
        if self.journal.finished(did):
            log.debug("deployment %s already %s; not applied again", did, self.journal.state(did))
            return
        try:  # authentic, but for this device, now, and newer than what it has accepted?
            self._check_release(manifest, topic)
        except ManifestRejected as exc:
            self._report(DeployEvent(did, "rejected", error=str(exc)))
            return
        self.last_deployment = did
        resumed = self.journal.state(did) is not None
        self._report(DeployEvent(did, "received", resumed=resumed,
                                 model=ModelRef(manifest.model.name, manifest.model.version)))
        try:
            self._deploy(raw, manifest)
        except Interrupted:
            log.info("deployment %s interrupted by shutdown; it resumes when the agent starts again", did)
        except ManifestRejected as exc:
            self._report(DeployEvent(did, "rejected", error=str(exc)))
        except (TransferError, ValidationFailed, OSError, ValueError, RuntimeError) as exc:
            self._report(DeployEvent(did, "failed", error=str(exc)))
        finally:
            r = self._receivers.pop(did, None)
            if r is not None:
                r.close()
            if self.journal.finished(did):  # over: nothing to resume, so no bytes left behind in staging
                for leftover in (f"{did}.part", f"{did}.have"):
                    (self.staging / leftover).unlink(missing_ok=True)

    def _deploy(self, raw: dict, m: DeploymentManifest) -> None:
        did, spec = m.deployment_id, m.model
        self.release.accept(m)  # before anything is applied (an OSError here, e.g. a full disk: failed)
        limit = self.cfg.deploy.max_model_mb * 2**20
        if spec.size > limit:
            raise ManifestRejected(f"model is {spec.size / 2**20:.1f} MB; this device accepts at most "
                                   f"{self.cfg.deploy.max_model_mb:g} MB (deploy.max_model_mb)")
        running = self.current_model().info
        if running.sha256 == spec.sha256 and (running.name, running.version) == (spec.name, spec.version):
            self._report(DeployEvent(did, "committed", progress=1.0, note="this model is already running"))
            return
        installed = self.store.get(spec.sha256)
        if installed is None:
            staged = self._download(m)
            self._report(DeployEvent(did, "verifying"))
            staging.verify(staged, m)
        else:
            staged = installed.path
        self._report(DeployEvent(did, "validating"))
        staging.validate(staged, m, raw, self.staging, backend=self.cfg.runtime.backend,
                         accelerator=self.cfg.runtime.accelerator, timeout=self.cfg.deploy.validate_timeout_s)
        self._report(DeployEvent(did, "activating"))
        staging.install_baseline(self.store, self.current_model().info, self.staging)
        self._activate(m, staging.install(self.store, staged, m, raw, staged_is_installed=installed is not None))

    def _download(self, m: DeploymentManifest) -> Path:
        self._downloading = m
        self._abort.clear()
        try:
            return download(m, self.staging, receivers=self._receivers, report=self._report, stop=self._stop,
                            abort=self._abort, timeout_s=self.cfg.deploy.download_timeout_s,
                            allow_file=self.cfg.deploy.allow_file_urls)
        finally:
            self._downloading = None

    def _activate(self, m: DeploymentManifest, stored: StoredModel) -> None:
        did, terms = m.deployment_id, probation.terms_for(m.probation, self.cfg.deploy, self.cfg.camera.fps)
        new = self._load(stored.path)  # loaded and warmed while the old model keeps serving
        baseline = percentile(self.stats.inference_ms, 95)
        errors_before = self.stats.errors
        processed_before = self.stats.processed
        old = self.activate_model(new)
        self.store.activate(stored.sha256)
        self._end_probation()
        self._probation = probation.Probation(did, stored.sha256, time.monotonic() + terms.seconds, terms, old,
                                              baseline, processed_before, errors_before)
        self.probation_record.save(self._probation)
        self._report(DeployEvent(did, "active", progress=1.0, model=ModelRef.of(stored)))
        if terms.seconds == 0:  # no probation asked for: committed as it goes active
            self._end_probation()
            self._report(DeployEvent(did, "committed", model=ModelRef.of(stored), note="no probation"))

    # -- probation and rollback ---------------------------------------------------------------------
    def _check_probation(self) -> None:
        p = self._probation
        if p is None:
            return
        stats = self.stats
        v = probation.verdict(p, processed=stats.processed, errors=stats.errors, inference_ms=list(stats.inference_ms),
                              last_error=stats.last_error, now=time.monotonic())
        if v.kind == "roll_back":
            self._rollback(p.deployment_id, v.reason)
        elif v.kind == "commit":
            self._end_probation()
            stored = self.store.get(p.sha256)
            self._report(DeployEvent(p.deployment_id, "committed", model=ModelRef.of(stored) if stored else None,
                                     note=f"passed probation ({v.reason})"))

    def _end_probation(self) -> None:
        """Probation is over (passed, or a newer model came): the model it kept for a swap back is closed."""
        p, self._probation = self._probation, None
        self.probation_record.clear()
        if p is not None and p.previous is not None:
            p.previous.close()

    def _rollback(self, deployment_id: str | None, reason: str, to: str | None = None) -> StoredModel:
        """Back to the previous version, or to the stored version ``to``."""
        p = self._probation
        if to is None:
            target = self.store.previous()
            if target is None:
                raise RuntimeError("no previous version to roll back to")
        else:
            stored = [m for m, active in self.store.list() if not active]
            target = next((m for m in stored if m.version == to), None)
            if target is None:
                have = ", ".join(dict.fromkeys(m.version for m in stored)) or "none"
                raise RuntimeError(f"no stored version {to[:64]!r} to roll back to (stored: {have})")
        if p is not None and p.previous is not None and p.previous.info.sha256 == target.sha256:
            previous = p.previous  # still loaded: the swap back is instant
            self._probation = None
        else:
            self._end_probation()
            previous = self._load(target.path)
        old = self.activate_model(previous)
        old.close()
        if to is None:
            self.store.rollback()
        else:
            self.store.activate(target.sha256)
        self._report(DeployEvent(deployment_id, "rolled_back", error=reason, model=ModelRef.of(target)))
        return target

    def _handle_command(self, command: str, args: dict) -> CommandReply:
        if command == "rollback":
            to = args.get("to")
            if to is not None and not isinstance(to, str):
                return CommandReply.failed("to must be a version (text)")
            try:
                did = self._probation.deployment_id if self._probation else self.last_deployment
                target = self._rollback(did, "rolled back by command", to)
            except (RuntimeError, OSError) as exc:
                return CommandReply.failed(str(exc))
            stuck = time.monotonic() - self.stats.last_frame_mono
            if stuck > FRAME_LOOP_STUCK_S:  # honest: the swap happened, but nothing is being served
                return CommandReply.failed(f"rolled back to {target.name} {target.version}, but the frame loop has "
                                           f"not turned for {stuck:.0f} s (a hung runtime?); restart the agent")
            return CommandReply(True, result={"model": ModelRef.of(target).to_json()})
        if command == "models":
            models = [{"name": s.name, "version": s.version, "sha256": s.sha256, "format": s.manifest.get("format"),
                       "task": s.manifest.get("task"), "active": active} for s, active in self.store.list()]
            if not models:
                info = self.current_model().info
                models = [{**info.to_json(), "active": True, "origin": "configured"}]
            return CommandReply(True, result={"models": models, "deployments": self.journal.latest(10)})
        return CommandReply.failed(f"the deployer does not handle {command!r}")
