"""cloud-sync's configuration: pydantic models loaded from TOML, validated once at start.

Unknown keys are errors that name the key (`grpc.listn`), like the agent's config. Not for runtime state.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError

from cloud_sync.errors import InvalidArgument
from edgefleet.addresses import parse_broker_url, parse_host_port

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - cloud-sync runs on 3.11+, mypy checks at 3.10
    import tomli as tomllib

__all__ = ["CloudSyncConfig", "ConfigProblem", "load_config"]


class ConfigProblem(InvalidArgument):
    """A config file is unreadable or invalid; the message names the file and the key."""


def _listen_address(value: str) -> str:
    parse_host_port(value)  # AddressError is a ValueError: pydantic reports it against the key
    return value


def _optional_address(value: str) -> str:
    return _listen_address(value) if value else value


def _optional_broker_url(value: str) -> str:
    if value:
        parse_broker_url(value)
    return value


# host:port, or empty.
OptionalAddress = Annotated[str, AfterValidator(_optional_address)]
# mqtt:// or mqtts:// URL, or empty.
OptionalBrokerUrl = Annotated[str, AfterValidator(_optional_broker_url)]

# Checked here, so that check-config refuses what `run` could not listen on (a port past 65535 once bound
# gRPC to that port modulo 65536, and made the admin API fail with an OverflowError).
ListenAddress = Annotated[str, AfterValidator(_listen_address)]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ServerSection(_Section):
    data_dir: str = Field("./cloud-sync-data", description="Where the signing key, admin token and SQLite file live.")
    log_level: str = Field("info", pattern="^(debug|info|warning|error)$", description="Lowest level logged.")
    shutdown_grace_s: float = Field(10.0, ge=0, le=600, description="How long calls in flight may finish on SIGTERM.")
    public_grpc_target: OptionalAddress = Field(
        "",
        description="host:port devices reach the gRPC services at, told them at enrollment (behind a load balancer "
        "or NAT); empty: the grpc.listen address.",
    )


class GrpcSection(_Section):
    listen: ListenAddress = Field(
        "127.0.0.1:7000", description="host:port of the device-facing gRPC services (uplink)."
    )
    max_message_bytes: int = Field(
        64 * 1024 * 1024, ge=1024, le=2**31 - 1, description="Largest message a device may send (a ResultBatch)."
    )
    ingest_threads: int = Field(4, ge=1, le=64, description="Threads that write uploaded batches to the database.")


class HttpSection(_Section):
    listen: ListenAddress = Field("127.0.0.1:8080", description="host:port of the admin API (fleetctl) and /metrics.")
    max_body_bytes: int = Field(
        1024 * 1024, ge=1024, le=2**31 - 1, description="Largest request body the admin API reads; larger: 413."
    )


class DatabaseSection(_Section):
    url: str = Field(
        "", description="SQLAlchemy URL: empty = SQLite in data_dir; postgresql+psycopg://... for several replicas."
    )


def _reserved_name(value: str) -> str:
    """cloud-sync's broker user and client id must be names no device can be registered under."""
    from cloud_sync.store.devices import RESERVED_PREFIXES, is_reserved

    if value and not is_reserved(value):
        raise ValueError(f"{value!r} must start with {RESERVED_PREFIXES[0]}: every other name may be a device's id")
    return value


# Names devices can never hold (DeviceRegistry refuses them), so no device can take cloud-sync's identity.
ReservedName = Annotated[str, AfterValidator(_reserved_name)]


class MqttSection(_Section):
    url: str = Field("", description="MQTT broker (mqtt://host:port); empty: no telemetry or presence ingest.")
    topic_prefix: str = Field("edgefleet/v1", description="Prefix of every device topic.")
    share_group: str = Field("cloud-sync", description="Shared-subscription group: replicas split the messages.")
    username: ReservedName = Field(
        "", description="Broker user of cloud-sync, starting with cloud-sync (see docs/mqtt.md for the ACL)."
    )
    password_file: str = Field("", description="File holding that user's password.")
    client_id: ReservedName = Field(
        "",
        max_length=128,
        description="This replica's MQTT client id, starting with cloud-sync, stable across its restarts (the broker "
        "keeps its session) and distinct between replicas; empty: cloud-sync-<hostname>.",
    )
    device_url: OptionalBrokerUrl = Field(
        "", description="Broker URL devices are told at enrollment (mqtts://broker.example:8883); empty: url."
    )
    manage_accounts: Literal["none", "mosquitto-dynsec"] = Field(
        "none",
        description="none: the operator manages device accounts on the broker; mosquitto-dynsec: cloud-sync creates "
        "each enrolled device's account (user = device id, password = its token, only its own topics) and "
        "disables a revoked one, through Mosquitto's dynamic security plugin.",
    )
    accounts_username: str = Field(
        "", description="Broker user allowed to send dynamic-security commands; empty: username."
    )
    accounts_password_file: str = Field("", description="File holding that user's password; empty: password_file.")
    republish_after_s: float = Field(
        30.0,
        ge=0.5,
        le=3600,
        description="How long a device's report may stay behind its desired state (or quiet and unconverged) before "
        "the desired state is published to it again, which makes it report again (a lost message); then after "
        "twice as long, up to 10 minutes.",
    )


class RegistrySection(_Section):
    blob_dir: str = Field(
        "",
        description="Where model blobs live (content-addressed); empty: <data_dir>/blobs. Replicas share it (NFS/EFS).",
    )
    max_blob_bytes: int = Field(
        4 * 1024**3, ge=1024, le=2**40, description="Largest model file (blob) the admin API takes; larger: 413."
    )
    signing_key_file: str = Field(
        "",
        description="The fleet's ed25519 signing key (PEM, 0600, made on first start); empty: "
        "<data_dir>/fleet-signing.key.",
    )


class RolloutsSection(_Section):
    tick_s: float = Field(
        2.0, gt=0, le=60, description="How often the rollout controller reads each running rollout's gates."
    )


class CloudSyncConfig(_Section):
    server: ServerSection = ServerSection()
    grpc: GrpcSection = GrpcSection()
    http: HttpSection = HttpSection()
    database: DatabaseSection = DatabaseSection()
    mqtt: MqttSection = MqttSection()
    registry: RegistrySection = RegistrySection()
    rollouts: RolloutsSection = RolloutsSection()

    @property
    def data_dir(self) -> Path:
        return Path(self.server.data_dir)

    @property
    def database_url(self) -> str:
        return self.database.url or f"sqlite:///{(self.data_dir / 'cloud-sync.db').resolve()}"


def config_from_dict(data: dict[str, Any], source: str = "config") -> CloudSyncConfig:
    try:
        return CloudSyncConfig.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        key = ".".join(str(part) for part in first["loc"])
        message = "unknown key" if first["type"] == "extra_forbidden" else first["msg"].removeprefix("Value error, ")
        raise ConfigProblem(f"{source}: {key}: {message}") from None


def load_config(path: str | Path | None) -> CloudSyncConfig:
    """The config in `path`, or the defaults when `path` is None."""
    if path is None:
        return CloudSyncConfig()
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigProblem(f"cannot read config {path}: {exc.strerror}") from exc
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigProblem(f"{path}: not valid TOML: {exc}") from exc
    return config_from_dict(data, str(path))
