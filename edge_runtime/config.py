"""The agent's configuration: frozen dataclasses loaded from TOML and validated once at start.

Unknown keys, wrong types and out-of-range values are errors that name the key (`inference.max_batch_sze`).
Scaling policies from the cloud reuse these same section types (the policy sections and the loader live in
edgefleet, which the cloud shares; they are re-exported here). Not for runtime state: see models/store.py.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

from edge_runtime._compat import tomllib
from edge_runtime.errors import ConfigError
from edgefleet import settings as _settings
from edgefleet.policy import BufferPolicy, InferencePolicy, SamplesPolicy, TelemetryPolicy, UploadPolicy
from edgefleet.settings import option

__all__ = [
    "AgentConfig",
    "AgentSection",
    "BufferPolicy",
    "CloudSection",
    "EngineSection",
    "InferencePolicy",
    "MqttSection",
    "SamplesPolicy",
    "ServerSection",
    "TelemetryPolicy",
    "UploadPolicy",
    "config_from_dict",
    "field_docs",
    "load_config",
]

T = TypeVar("T")


@dataclass(frozen=True)
class AgentSection:
    data_dir: str = option("/var/lib/edgefleet", "Where models, caches and the outbox live.")
    log_level: Literal["debug", "info", "warning", "error"] = option("info", "Lowest level written to stdout.")
    shutdown_grace_s: float = option(
        10.0, "On SIGTERM, how long in-flight and queued requests may take to finish.", min=0, max=600
    )
    watchdog: bool = option(True, "Ping systemd's watchdog (WatchdogSec=) when NOTIFY_SOCKET is set.")


@dataclass(frozen=True)
class ServerSection:
    unix_socket: str = option("/run/edgefleet/inference.sock", "KServe v2 gRPC on this Unix socket; empty disables it.")
    tcp_address: str = option("127.0.0.1:8001", "KServe v2 gRPC on this host:port; empty disables it.")
    http_unix_socket: str = option(
        "/run/edgefleet/inference-http.sock", "KServe v2 HTTP/REST on this Unix socket; empty disables it."
    )
    http_tcp_address: str = option(
        "127.0.0.1:8000", "KServe v2 HTTP/REST on this host:port (loopback only); empty disables it."
    )
    max_request_bytes: int = option(
        64 * 1024 * 1024,
        "Largest inference request accepted (bytes of tensor data); larger ones get RESOURCE_EXHAUSTED.",
        min=1024,
        max=2**31 - 1,
    )
    metrics_address: str = option(
        "127.0.0.1:9464", "Prometheus metrics on http://host:port/metrics; empty disables them."
    )
    strict_readiness: bool = option(
        True,
        "ServerReady is true only while every installed model serves a READY version and none is loading "
        "(Triton's default). false: ServerReady is true while the agent is up; apps check each model with "
        "ModelReady.",
    )


@dataclass(frozen=True)
class EngineSection:
    backend: Literal["auto", "tensorrt", "onnxruntime"] = option(
        "auto", "auto: TensorRT where it imports and a GPU is present, else ONNX Runtime."
    )
    intra_op_threads: int = option(
        0,
        "ONNX Runtime threads per inference; 0 lets ONNX Runtime use one per physical core.",
        min=0,
        max=256,
    )
    warmup_inferences: int = option(
        3,
        "Warm-up inferences a model must pass before it is READY, on the package's warm-up inputs or shapes "
        "(generated data where it has none).",
        min=1,
        max=1000,
    )
    tensorrt_workspace_mib: int = option(1024, "TensorRT builder workspace limit (MiB).", min=16, max=1 << 20)
    tensorrt_fp16: bool = option(
        False,
        "TensorRT 10: allow FP16 kernels. TensorRT 11 builds strongly typed networks only; there precision "
        "comes from the ONNX file and this flag is ignored with a warning.",
    )


@dataclass(frozen=True)
class CloudSection:
    grpc_target: str = option(
        "", "cloud-sync's gRPC address (host:port); empty: no uplink, results stay in the outbox."
    )
    device_id: str = option("", "This device's id, given at enrollment.")
    token_file: str = option("", "File holding the device token (mode 0600), given at enrollment.")
    ca_file: str = option(
        "",
        "PEM CA bundle for TLS to cloud-sync and the broker; empty: the one enrollment trusted (--ca-file), else "
        "plaintext, allowed to loopback targets only.",
    )
    client_cert_file: str = option(
        "",
        "PEM client certificate (signed by the fleet CA, its name the device id) for the broker's TLS listener "
        "and for cloud-sync when it asks for one (mTLS); empty: the one enrollment issued, if any (else the "
        "broker is given the device id and token only).",
    )
    client_key_file: str = option("", "PEM private key of client_cert_file (mode 0600); set both or neither.")
    signing_key_file: str = option(
        "",
        "The fleet's ed25519 public key (raw 32 bytes) that model manifests must be signed with; set by enrollment.",
    )


@dataclass(frozen=True)
class MqttSection:
    url: str = option("", "MQTT broker, mqtt://host:port; empty: telemetry and presence are not published.")
    topic_prefix: str = option("edgefleet/v1", "Prefix of every topic this device uses.")
    keepalive_s: int = option(
        30, "MQTT keepalive; the broker declares the device offline after 1.5x this.", min=5, max=3600
    )
    qos: int = option(1, "QoS of telemetry messages (presence and reported state are always QoS 1).", min=0, max=1)


@dataclass(frozen=True)
class AgentConfig:
    agent: AgentSection = field(default_factory=AgentSection)
    server: ServerSection = field(default_factory=ServerSection)
    engine: EngineSection = field(default_factory=EngineSection)
    inference: InferencePolicy = field(default_factory=InferencePolicy)
    upload: UploadPolicy = field(default_factory=UploadPolicy)
    buffer: BufferPolicy = field(default_factory=BufferPolicy)
    telemetry: TelemetryPolicy = field(default_factory=TelemetryPolicy)
    samples: SamplesPolicy = field(default_factory=SamplesPolicy)
    cloud: CloudSection = field(default_factory=CloudSection)
    mqtt: MqttSection = field(default_factory=MqttSection)

    @property
    def data_dir(self) -> Path:
        return Path(self.agent.data_dir)


def load_config(path: str | Path) -> AgentConfig:
    """Read and validate a TOML config file; a ConfigError names the file and the key."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read config {path}: {exc.strerror}") from exc
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from exc
    try:
        return config_from_dict(AgentConfig, data)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from exc


def config_from_dict(cls: type[T], data: Mapping[str, Any], prefix: str = "") -> T:
    """Build the frozen dataclass `cls` from plain data, checking keys, types and bounds (ConfigError)."""
    return _settings.config_from_dict(cls, data, prefix, ConfigError)


def _convert(hint: Any, value: Any, key: str, meta: Mapping[str, Any]) -> Any:
    return _settings._convert(hint, value, key, meta, ConfigError)


def field_docs(cls: type = AgentConfig, prefix: str = "") -> dict[str, tuple[Any, str]]:
    """Every leaf key of the config as 'section.key' -> (default, documentation)."""
    return _settings.field_docs(cls, prefix)
