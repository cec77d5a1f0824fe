"""Typed configuration: agent.yaml plus EDGE_AGENT__SECTION__KEY environment overrides."""

from __future__ import annotations

import ipaddress
import os
import socket
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from agent.vocab import Accelerator, one_of


def _bundle_root() -> Path:
    """Where the bundled models/ and assets/ are: a checkout, $EDGE_AGENT_SHARE, or install.sh's place."""
    checkout = Path(__file__).resolve().parent.parent
    for candidate in (os.environ.get("EDGE_AGENT_SHARE"), checkout, "/opt/edge-agent/share"):
        if candidate and (Path(candidate) / "models").is_dir():
            return Path(candidate)
    return checkout


BUNDLE_ROOT = _bundle_root()
BUNDLED_CONFIG = BUNDLE_ROOT / "config" / "agent.yaml"
SYSTEM_CONFIG = Path("/etc/edge-agent/agent.yaml")
ENV_PREFIX = "EDGE_AGENT__"


class ConfigError(Exception):
    """A configuration file that cannot be used; ``problems`` holds one line per problem."""

    def __init__(self, source: str, problems: list[str]):
        self.source = source
        self.problems = problems
        super().__init__(f"{source}: " + "; ".join(problems))


def topic_prefix(v: str) -> str:
    """A topic prefix (mqtt.prefix, homeassistant.prefix): no wildcards, no slash at either end."""
    if not v or any(c in v for c in "#+") or v.startswith("/") or v.endswith("/"):
        raise ValueError(f"expected a topic prefix without wildcards or edge slashes, got {v!r}")
    return v


def loopback_name(host: str) -> bool:
    """A loopback IP literal or ``localhost``; a name like 127.example.com is not (DNS can point it anywhere)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class MqttConfig(_Section):
    url: str = Field("mqtt://127.0.0.1:1883", description="mqtt://host:port, or mqtts:// for TLS")
    prefix: str = Field("edge", description="first level of every topic")
    predictions_qos: Literal[0, 1] = Field(0, description="1 keeps predictions in the durable outbox")
    protocol: Literal["5", "3.1.1"] = "5"
    keepalive_s: int = Field(30, ge=5, le=3600)
    client_id: str | None = None
    username: str | None = None
    password_file: Path | None = Field(None, description="file holding the password (never put it in YAML)")
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    outbox_max_mb: float = Field(50.0, ge=1, description="the outbox's bound on disk (a message must fit)")
    outbox_rate: float = Field(200.0, gt=0, description="max messages/s the outbox sends (control first, then live, then backlog)")
    max_packet_kb: int | None = Field(None, ge=1, description="largest MQTT packet the broker takes (MQTT 5 "
                                      "brokers say it themselves; AWS IoT Core: 128)")

    @field_validator("url")
    @classmethod
    def _scheme(cls, v: str) -> str:
        from urllib.parse import urlsplit

        parts = urlsplit(v)
        if parts.password:
            # Never echo it back: the error would carry the secret into logs.
            raise ValueError("credentials in the URL are not accepted: put the password in mqtt.password_file "
                             "(or $EDGE_AGENT_MQTT_PASSWORD) and the user in mqtt.username")
        if not v.startswith(("mqtt://", "mqtts://")):
            raise ValueError(f"expected mqtt://host:port or mqtts://host:port, got {v!r}")
        return v

    @field_validator("prefix")
    @classmethod
    def _prefix(cls, v: str) -> str:
        return topic_prefix(v)

    @model_validator(mode="after")
    def _cert_pair(self) -> MqttConfig:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file go together (mutual TLS needs both)")
        return self


class CameraConfig(_Section):
    source: str = Field("auto", description="auto | /dev/videoN | N | rtsp://… | file | images:DIR | synthetic | gst:… | picamera2")
    fps: float = Field(15.0, ge=0, description="frame-rate cap; 0 = as fast as frames come")
    loop: bool = True
    width: int = Field(640, gt=0)
    height: int = Field(480, gt=0)
    stall_s: float = Field(5.0, gt=0, description="reopen the source after this long without a frame")


class ModelConfig(_Section):
    path: Path = Path("models/face/blazeface.tflite")
    task: str | None = Field(None, description="a registered task: classification | ssd | yolo | blazeface | raw")
    labels: Path | None = None
    threshold: float | None = Field(None, ge=0, le=1)

    @field_validator("task")
    @classmethod
    def _known_task(cls, v: str | None) -> str | None:
        from agent.vision.registry import check_task

        return check_task(v)


class RuntimeConfig(_Section):
    backend: str = Field("auto", description="auto, or a registered backend: tflite | onnxruntime")
    accelerator: Accelerator = "auto"
    threads: int = Field(0, ge=0, description="0 = every core on 2-3 cores, all but one on 4 or more")
    spin: Literal["auto", "on", "off"] = Field("auto", description="thread pool spin-waiting between runs "
                                               "(onnxruntime): auto tries it while inference-bound")


    @field_validator("backend")
    @classmethod
    def _known_backend(cls, v: str) -> str:
        from agent.runtimes.registry import backend_names

        if v != "auto" and v not in backend_names():
            raise ValueError(f"expected {one_of(('auto', *backend_names()))}, got {v!r}")
        return v


class HealthConfig(_Section):
    interval_s: float = Field(10.0, gt=0)


class DeployConfig(_Section):
    trusted_keys: list[str] = Field(default_factory=list, description="Ed25519 public keys (base64, PEM or a file)")
    max_model_mb: float = Field(200.0, gt=0)
    probation_s: float = Field(60.0, ge=0, description="roll back a new model that misbehaves within this time")
    probation_min_frames: int = Field(10, ge=0, description="fewer frames served in probation is a failure")
    probation_latency_factor: float = Field(3.0, ge=1, description="inference p95 allowed, times the last model's")
    validate_timeout_s: float = Field(60.0, gt=0)
    download_timeout_s: float = Field(600.0, gt=0, description="the whole download, MQTT chunks or URL")
    allow_file_urls: bool = Field(False, description="accept file:// sources (a path on this device)")
    keep_versions: int = Field(3, ge=1, description="previous versions kept for rollback")

    @field_validator("trusted_keys")
    @classmethod
    def _keys(cls, v: list[str]) -> list[str]:
        from agent.deploy.manifest import load_public_key

        for key in v:
            load_public_key(key)  # ValueError names the bad key
        return v


class HttpConfig(_Section):
    listen: str = Field("127.0.0.1:8080", description='host:port of the page, API and metrics; "" = off')
    token_file: Path | None = Field(None, description="file holding the Bearer token; required off loopback")
    cert_file: Path | None = Field(None, description="TLS certificate (PEM); with key_file, the server speaks https")
    key_file: Path | None = None
    max_viewers: int = Field(4, ge=1, le=64, description="MJPEG streams served at once; more get 503")
    stream_fps: float = Field(10.0, gt=0, le=60, description="MJPEG frames per second at most")

    @field_validator("listen")
    @classmethod
    def _listen(cls, v: str) -> str:
        if v == "":
            return v
        host, sep, port = v.rpartition(":")
        host = host.strip("[]")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f'expected host:port (e.g. 127.0.0.1:8080, [::1]:8080, 0.0.0.0:8080) or "", got {v!r}')
        return v

    @property
    def host_port(self) -> tuple[str, int]:
        host, _, port = self.listen.rpartition(":")
        return host.strip("[]"), int(port)

    @property
    def loopback(self) -> bool:
        return loopback_name(self.host_port[0])

    @model_validator(mode="after")
    def _token_off_loopback(self) -> HttpConfig:
        if self.listen and not self.loopback and self.token_file is None:
            raise ValueError(f"http.listen {self.listen} is not a loopback address: set http.token_file to a file "
                             "holding a Bearer token (or listen on 127.0.0.1)")
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("http.cert_file and http.key_file go together")
        return self


class HomeAssistantConfig(_Section):
    enabled: bool = Field(False, description="publish Home Assistant MQTT discovery (device-based)")
    prefix: str = Field("homeassistant", description="Home Assistant's discovery prefix")

    @field_validator("prefix")
    @classmethod
    def _prefix(cls, v: str) -> str:
        return topic_prefix(v)


class AgentConfig(_Section):
    device_id: str = Field(default_factory=socket.gethostname)
    groups: list[str] = Field(default_factory=list)
    mqtt: MqttConfig = Field(default_factory=MqttConfig)
    camera: CameraConfig = Field(default_factory=CameraConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    runtime: RuntimeConfig = Field(default_factory=RuntimeConfig)
    health: HealthConfig = Field(default_factory=HealthConfig)
    deploy: DeployConfig = Field(default_factory=DeployConfig)
    http: HttpConfig = Field(default_factory=HttpConfig)
    homeassistant: HomeAssistantConfig = Field(default_factory=HomeAssistantConfig)
    state_dir: Path = Path("/var/lib/edge-agent")
    log_level: Literal["debug", "info", "warning", "error"] = "info"

    @field_validator("device_id")
    @classmethod
    def _device_id(cls, v: str) -> str:
        if not v or any(c in v for c in "/#+") or v in (".", ".."):
            raise ValueError(f"expected a name without '/', '#' or '+', got {v!r}")
        return v

    @field_validator("groups")
    @classmethod
    def _groups(cls, v: list[str]) -> list[str]:
        for g in v:
            if not g or any(c in g for c in "/#+"):
                raise ValueError(f"expected group names without '/', '#' or '+', got {g!r}")
        return v


def resolve_path(path: Path, base: Path | None) -> Path:
    """A relative path is looked up beside the config file, then in the bundle (repo) root."""
    path = path.expanduser()
    if path.is_absolute():
        return path
    for root in (base, BUNDLE_ROOT):
        if root is not None and (root / path).exists():
            return (root / path).resolve()
    return ((base or Path.cwd()) / path).resolve()


def default_config_path() -> Path:
    """$EDGE_AGENT_CONFIG, else /etc/edge-agent/agent.yaml, else the bundled config/agent.yaml."""
    env = os.environ.get("EDGE_AGENT_CONFIG")
    if env:
        return Path(env)
    return SYSTEM_CONFIG if SYSTEM_CONFIG.exists() else BUNDLED_CONFIG


def _env_overrides(environ: dict[str, str]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for key, raw in environ.items():
        if not key.startswith(ENV_PREFIX):
            continue
        parts = [p.lower() for p in key[len(ENV_PREFIX):].split("__") if p]
        node = tree
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                break
        else:
            try:  # YAML scalars, so EDGE_AGENT__CAMERA__FPS=5 is a number and ...__LOOP=false a bool
                value = yaml.safe_load(raw) if raw.strip() else raw
            except yaml.YAMLError:
                value = raw
            node[parts[-1]] = value
    return tree


def _in_tree(tree: dict[str, Any], loc: tuple) -> bool:
    node: Any = tree
    for part in loc:
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


class _UniqueKeyLoader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):  # type: ignore[misc]
    """YAML's safe loader, refusing a key given twice in one mapping (the later one would silently win)."""

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                mark = key_node.start_mark
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (first at line {seen[key] + 1}); the file would mean "
                    "only the last one", mark)
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


_EXPECTED = {
    "float_parsing": "expected a number",
    "float_type": "expected a number",
    "int_parsing": "expected an integer",
    "int_type": "expected an integer",
    "int_from_float": "expected an integer",
    "bool_parsing": "expected true or false",
    "bool_type": "expected true or false",
    "string_type": "expected text",
    "list_type": "expected a list",
    "model_type": "expected a mapping of keys",
    "dict_type": "expected a mapping of keys",
    "path_type": "expected a file path",
}


def _describe(err: dict[str, Any], env: dict[str, Any] | None = None) -> str:
    loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
    if env and _in_tree(env, err["loc"]):  # the value came from the environment, not the file: say so
        loc = f"{loc} (from {ENV_PREFIX}{'__'.join(str(p).upper() for p in err['loc'])})"
    kind = err["type"]
    got = err.get("input")
    if kind == "extra_forbidden":
        return f"{loc}: unknown key (check the spelling against config/agent.yaml)"
    if kind == "missing":
        return f"{loc}: required"
    if kind == "literal_error":
        return f"{loc}: expected {err['ctx']['expected']}, got {got!r}"
    if kind in _EXPECTED:
        return f"{loc}: {_EXPECTED[kind]}, got {got!r}"
    msg = err["msg"].removeprefix("Value error, ")
    if "credentials in the URL" in msg:
        return f"{loc}: {msg}"
    return f"{loc}: {msg}" + ("" if repr(got) in msg or isinstance(got, dict) else f", got {got!r}")


def parse_config(data: Any, source: str = "<config>", environ: dict[str, str] | None = None,
                 base: Path | None = None) -> AgentConfig:
    """Validate a loaded YAML document (plus env overrides) into an AgentConfig, or raise ConfigError."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(source, [f"(top level): expected a mapping of keys, got {type(data).__name__}"])
    env = _env_overrides(dict(os.environ) if environ is None else environ)
    data = _merge(data, env)
    try:
        cfg = AgentConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(source, [_describe(e, env) for e in exc.errors()]) from None
    cfg.model.path = resolve_path(cfg.model.path, base)
    if cfg.model.labels is not None:
        cfg.model.labels = resolve_path(cfg.model.labels, base)
    for section, key in (("http", "token_file"), ("http", "cert_file"), ("http", "key_file")):
        value = getattr(getattr(cfg, section), key)
        if value is not None:
            setattr(getattr(cfg, section), key, resolve_path(value, base))
    cfg.state_dir = resolve_path(cfg.state_dir, base) if not cfg.state_dir.is_absolute() else cfg.state_dir
    return cfg


def load_config(path: str | Path | None = None, environ: dict[str, str] | None = None) -> AgentConfig:
    """Read, merge env overrides, validate. Raises ConfigError with one line per problem."""
    p = Path(path) if path else default_config_path()
    try:
        text = p.read_text()
    except FileNotFoundError:
        raise ConfigError(str(p), ["file not found"]) from None
    except OSError as exc:
        raise ConfigError(str(p), [f"cannot read: {exc.strerror}"]) from None
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        raise ConfigError(str(p), [f"{where}not valid YAML ({getattr(exc, 'problem', exc)})"]) from None
    return parse_config(data, str(p), environ, base=p.resolve().parent)
