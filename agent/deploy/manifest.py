"""The deployment manifest: schema, canonical form, Ed25519 signatures."""

from __future__ import annotations

import base64
import hashlib
import json
from pathlib import Path
from typing import Annotated, Literal

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from agent.deploy.golden import Golden
from agent.runtimes.registry import format_names
from agent.vision.params import DecodeSettings, PreprocessSpec
from agent.vision.registry import check_task
from agent.vocab import ID_PATTERN, SHA256_PATTERN, VERSION_PATTERN, is_safe_id, one_of

MAX_MANIFEST_BYTES = 256 * 1024
MAX_CHUNK_BYTES = 128 * 1024  # AWS IoT Core's message limit
DEFAULT_CHUNK_BYTES = 96 * 1024
# Below this a model becomes so many chunks that the bookkeeping costs more than the bytes (each chunk
# rewrites the record of which arrived): 1-byte chunks of a 1000-byte model wrote ~1 GB.
MIN_CHUNK_BYTES = 16 * 1024


class ManifestRejected(ValueError):
    """The manifest must not be applied; the message says why in words a person can act on."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelSection(_Strict):
    name: str = Field(pattern=ID_PATTERN)
    version: str = Field(pattern=VERSION_PATTERN)
    format: str
    sha256: str = Field(pattern=SHA256_PATTERN)
    size: int = Field(gt=0)
    task: str
    labels: list[Annotated[str, Field(max_length=200)]] | None = Field(None, max_length=100_000)
    # The same schema as model.yaml's sections: a bad key is refused here, not later in the validation child.
    preprocess: PreprocessSpec | None = None
    decode: DecodeSettings | None = None

    @field_validator("format")
    @classmethod
    def _known_format(cls, v: str) -> str:
        if v not in format_names():
            raise ValueError(f"expected {one_of(format_names())}, got {v!r}")
        return v

    @field_validator("task")
    @classmethod
    def _known_task(cls, v: str) -> str:
        return check_task(v)  # type: ignore[return-value]


class MqttSource(_Strict):
    type: Literal["mqtt"]
    chunks: int = Field(gt=0, le=1_000_000)
    chunk_size: int = Field(gt=0, le=MAX_CHUNK_BYTES)
    # Each chunk's sha256, signed with the rest: a chunk that does not match is dropped and asked for
    # again, so one forged chunk cannot fail the deployment at the final hash.
    chunk_sha256: list[Annotated[str, Field(pattern=SHA256_PATTERN)]] | None = None

    @model_validator(mode="after")
    def _one_hash_per_chunk(self) -> MqttSource:
        if self.chunk_sha256 is not None and len(self.chunk_sha256) != self.chunks:
            raise ValueError(f"chunk_sha256 has {len(self.chunk_sha256)} hashes for {self.chunks} chunks")
        return self


class UrlSource(_Strict):
    type: Literal["url"]
    url: str = Field(pattern=r"^(https?|file)://", max_length=4096)


class Target(_Strict):
    """Who a manifest is for, inside the signed body: devices by id, or one group (exactly one of the two)."""

    devices: list[Annotated[str, Field(pattern=ID_PATTERN)]] | None = Field(None, min_length=1, max_length=10_000)
    group: str | None = Field(None, pattern=ID_PATTERN)

    @model_validator(mode="after")
    def _one_kind(self) -> Target:
        if (self.devices is None) == (self.group is None):
            raise ValueError("a target names either devices or a group")
        return self


class ProbationSection(_Strict):
    """Per-deployment probation (agent-ctl deploy --probation-s, --latency-allowance): e.g. to move to a
    heavier model on purpose. What is not given comes from the device's deploy.* config."""

    seconds: float | None = Field(None, ge=0, le=7 * 24 * 3600)
    min_frames: int | None = Field(None, ge=0)
    latency_factor: float | None = Field(None, ge=1, le=1000)


class DeploymentManifest(_Strict):
    deployment_id: str = Field(pattern=ID_PATTERN)
    model: ModelSection
    source: Annotated[MqttSource | UrlSource, Field(discriminator="type")]
    golden: Golden | None = None
    signature: str | None = None
    created: float | None = None
    # Signed with the rest (TUF/Uptane-style), so a signed manifest is one release for one target:
    target: Target | None = None
    issued_at: float | None = None
    expires_at: float | None = None
    key_id: str | None = Field(None, pattern=r"^[0-9a-f]{16}$")  # which trusted key signed it
    counter: int | None = Field(None, ge=0)  # release counter: a device accepts only ever higher ones
    probation: ProbationSection | None = None

    @model_validator(mode="after")
    def _chunks_cover_the_file(self) -> DeploymentManifest:
        s = self.source
        if isinstance(s, MqttSource) and not ((s.chunks - 1) * s.chunk_size < self.model.size <= s.chunks * s.chunk_size):
            raise ValueError(f"{s.chunks} chunks of {s.chunk_size} bytes do not hold a {self.model.size}-byte model")
        if isinstance(s, MqttSource) and s.chunks > 1 and s.chunk_size < MIN_CHUNK_BYTES:
            raise ValueError(f"chunks of {s.chunk_size} bytes are too small: at least {MIN_CHUNK_BYTES} "
                             "(unless the model fits in one)")
        return self


def parse_manifest(payload: bytes) -> tuple[dict, DeploymentManifest]:
    """The raw dict (for the signature) and the validated manifest; ManifestRejected otherwise."""
    if len(payload) > MAX_MANIFEST_BYTES:
        raise ManifestRejected(f"manifest is {len(payload)} bytes; the limit is {MAX_MANIFEST_BYTES}")
    try:
        raw = json.loads(payload)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ManifestRejected(f"manifest is not valid JSON ({exc})") from None
    if not isinstance(raw, dict):
        raise ManifestRejected("manifest must be a JSON object")
    try:
        return raw, DeploymentManifest.model_validate(raw)
    except ValidationError as exc:
        lines = [f"{'.'.join(map(str, e['loc'])) or 'manifest'}: {e['msg']}" for e in exc.errors()[:8]]
        raise ManifestRejected("invalid manifest: " + "; ".join(lines)) from None


def claimed_id(payload: bytes) -> str | None:
    """The deployment id of a payload that may not be a valid manifest, when it has a usable one."""
    try:
        did = json.loads(payload).get("deployment_id")
    except (ValueError, AttributeError, UnicodeDecodeError):
        return None
    return did if is_safe_id(did) else None


def canonical_bytes(raw: dict) -> bytes:
    """What is signed: the manifest without its signature, keys sorted, no whitespace, UTF-8."""
    body = {k: v for k, v in raw.items() if k != "signature"}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


# -- keys -----------------------------------------------------------------------------------------

def public_key_text(key: Ed25519PublicKey) -> str:
    """The one-line form that goes in deploy.trusted_keys: base64 of the 32 raw bytes."""
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return base64.b64encode(raw).decode()


def load_public_key(text: str) -> Ed25519PublicKey:
    """A trusted key: base64 raw (what keygen prints), a PEM block, or a path to either."""
    text = text.strip()
    if not text.startswith("-----BEGIN") and "/" in text and Path(text).is_file():
        text = Path(text).read_text().strip()
    if text.startswith("-----BEGIN"):
        key = serialization.load_pem_public_key(text.encode())
        if not isinstance(key, Ed25519PublicKey):
            raise ValueError("trusted key is not an Ed25519 public key")
        return key
    try:
        raw = base64.b64decode(text, validate=True)
    except ValueError:
        raise ValueError(f"trusted key {text[:12]!r}…: not base64, PEM, or a key file") from None
    if len(raw) != 32:
        raise ValueError(f"trusted key {text[:12]!r}…: an Ed25519 key is 32 bytes, this is {len(raw)}")
    return Ed25519PublicKey.from_public_bytes(raw)


def key_id(key: Ed25519PublicKey) -> str:
    """A key's short name in manifests: the first 16 hex digits of the sha256 of its 32 raw bytes."""
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def load_private_key(path: Path) -> Ed25519PrivateKey:
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(f"{path}: not an Ed25519 private key")
    return key


def sign(raw: dict, key: Ed25519PrivateKey) -> str:
    return base64.b64encode(key.sign(canonical_bytes(raw))).decode()


def check_signature(raw: dict, trusted: list[Ed25519PublicKey], *, what: str = "deployment",
                    how: str = "agent-ctl deploy --sign-key FILE") -> None:
    """Nothing when no keys are trusted or one of them signed it; ManifestRejected otherwise.

    ``raw`` is a manifest or a signed command (``what``, and ``how`` to sign one, word the refusal).
    """
    if not trusted:
        return
    sig_text = raw.get("signature")
    if not sig_text:
        raise ManifestRejected(f"unsigned {what}; this device only accepts one signed by a trusted key ({how})")
    try:
        sig = base64.b64decode(sig_text, validate=True)
    except (ValueError, TypeError):
        raise ManifestRejected("signature is not base64") from None
    data = canonical_bytes(raw)
    kid = raw.get("key_id")
    if kid is not None:
        trusted = [k for k in trusted if key_id(k) == kid]
        if not trusted:
            raise ManifestRejected(f"bad signature: signed by key {str(kid)[:16]}, which this device does not "
                                   "trust (deploy.trusted_keys)")
    for key in trusted:
        try:
            key.verify(sig, data)
            return
        except InvalidSignature:
            continue
    raise ManifestRejected("bad signature: no trusted key signed this manifest (or it was changed after signing)")
