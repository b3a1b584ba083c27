"""The agent's configuration: frozen dataclasses loaded from TOML and validated once at start.

Unknown keys, wrong types and out-of-range values are errors that name the key (`inference.max_batch_sze`).
Scaling policies from the cloud reuse these same section types. Not for runtime state: see models/store.py.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

from edge_runtime._compat import tomllib
from edge_runtime.errors import ConfigError

__all__ = [
    "AgentConfig",
    "AgentSection",
    "BufferPolicy",
    "CloudSection",
    "EngineSection",
    "InferencePolicy",
    "MqttSection",
    "ServerSection",
    "TelemetryPolicy",
    "UploadPolicy",
    "config_from_dict",
    "field_docs",
    "load_config",
]

T = TypeVar("T")


def option(default: Any, doc: str, *, min: float | None = None, max: float | None = None) -> Any:
    """A config field with its documentation and bounds (checked by the loader)."""
    return field(default=default, metadata={"doc": doc, "min": min, "max": max})


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
class InferencePolicy:
    max_batch_size: int = option(
        32, "Largest batch the batcher forms (the model's own limit also applies).", min=1, max=4096
    )
    max_queue_delay_ms: float = option(
        0.0,
        "How long a free engine waits for more requests to fill a batch; 0 runs what is queued at once.",
        min=0,
        max=10_000,
    )
    instances: int = option(1, "Engine workers per model version (requests run in parallel).", min=1, max=64)
    max_queue_depth: int = option(
        256,
        "Requests waiting per model version; beyond it requests get RESOURCE_EXHAUSTED.",
        min=1,
        max=1 << 20,
    )
    latency_slo_ms: float = option(
        0.0,
        "Per-batch latency target; the batcher picks the batch size and delay that hold it. 0: most throughput.",
        min=0,
        max=600_000,
    )
    priority_levels: int = option(2, "Request priorities 1..N (1 is served first).", min=1, max=16)
    default_priority: int = option(2, "Priority of requests that name none (1..priority_levels).", min=1, max=16)
    default_timeout_ms: float = option(
        0.0, "Queue timeout for requests that set none; 0: no timeout.", min=0, max=3_600_000
    )
    adaptive: bool = option(True, "Profile batch sizes when a model becomes READY and batch only where it pays.")

    def __post_init__(self) -> None:
        if self.default_priority > self.priority_levels:
            raise ConfigError(
                f"inference.default_priority ({self.default_priority}) must be within "
                f"1..inference.priority_levels ({self.priority_levels})"
            )


@dataclass(frozen=True)
class UploadPolicy:
    sample_rate: float = option(
        0.0, "Share of requests not marked edgefleet.keep whose input and result are kept anyway (0..1).", min=0, max=1
    )
    batch_max_records: int = option(1000, "Records per upload batch.", min=1, max=100_000)
    interval_s: float = option(
        1.0, "How often the uploader looks for new records when the outbox was drained.", min=0.01, max=3600
    )
    max_bytes_per_s: int = option(0, "Upload bandwidth cap (bytes/s of records); 0: no cap.", min=0, max=2**40)


@dataclass(frozen=True)
class BufferPolicy:
    max_bytes: int = option(
        256 * 1024 * 1024,
        "Outbox bound; past it records are evicted, lowest priority first, then oldest (and counted).",
        min=64 * 1024,
        max=2**44,
    )
    max_age_s: float = option(
        7 * 24 * 3600.0,
        "Records older than this are evicted (and counted); 0: no age limit.",
        min=0,
        max=10 * 365 * 86400,
    )


@dataclass(frozen=True)
class TelemetryPolicy:
    interval_s: float = option(10.0, "How often the agent publishes telemetry.", min=0.1, max=86_400)


@dataclass(frozen=True)
class CloudSection:
    grpc_target: str = option(
        "", "cloud-sync's gRPC address (host:port); empty: no uplink, results stay in the outbox."
    )
    device_id: str = option("", "This device's id, given at enrollment.")
    token_file: str = option("", "File holding the device token (mode 0600), given at enrollment.")
    ca_file: str = option(
        "", "PEM CA bundle for TLS to cloud-sync and the broker; empty: plaintext, allowed to loopback targets only."
    )
    client_cert_file: str = option(
        "",
        "PEM client certificate (signed by the fleet CA, its name the device id) for the broker's TLS listener; "
        "empty: the broker is given the device id and token instead.",
    )
    client_key_file: str = option("", "PEM private key of client_cert_file (mode 0600).")


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
    """Build the frozen dataclass `cls` from plain data, checking keys, types and bounds."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{prefix or 'config'} must be a table, not {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - set(fields))
    if unknown:
        where = f"{prefix}.{unknown[0]}" if prefix else unknown[0]
        raise ConfigError(f"unknown key '{where}' (known: {', '.join(sorted(fields))})")
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    for name, value in data.items():
        key = f"{prefix}.{name}" if prefix else name
        values[name] = _convert(hints[name], value, key, fields[name].metadata)
    try:
        return cls(**values)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{prefix or 'config'}: {exc}") from exc


def _convert(hint: Any, value: Any, key: str, meta: Mapping[str, Any]) -> Any:
    if dataclasses.is_dataclass(hint):
        return config_from_dict(typing.cast(type, hint), value, key)
    origin = typing.get_origin(hint)
    if origin is Literal:
        choices = typing.get_args(hint)
        if value not in choices:
            raise ConfigError(f"{key} must be one of {', '.join(map(repr, choices))}, not {value!r}")
        return value
    if origin in (typing.Union, types.UnionType):
        raise ConfigError(f"{key}: union types are not supported in config")  # pragma: no cover
    expected: tuple[type, ...] = (int, float) if hint is float else (hint,)
    # bool is an int subclass in Python, but `max_batch_size = true` is a typo, not a number.
    if (isinstance(value, bool) and hint is not bool) or not isinstance(value, expected):
        raise ConfigError(f"{key} must be {hint.__name__}, not {type(value).__name__} ({value!r})")
    if hint is float:
        value = float(typing.cast(float, value))
    low, high = meta.get("min"), meta.get("max")
    if (low is not None and value < low) or (high is not None and value > high):
        raise ConfigError(f"{key} = {value!r} is out of range [{low}, {high}]")
    return value


def field_docs(cls: type = AgentConfig, prefix: str = "") -> dict[str, tuple[Any, str]]:
    """Every leaf key of the config as 'section.key' -> (default, documentation)."""
    docs: dict[str, tuple[Any, str]] = {}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = f"{prefix}.{f.name}" if prefix else f.name
        if dataclasses.is_dataclass(hints[f.name]):
            docs.update(field_docs(hints[f.name], key))
        else:
            docs[key] = (f.default, f.metadata.get("doc", ""))
    return docs
