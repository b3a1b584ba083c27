"""cloud-sync's configuration: pydantic models loaded from TOML, validated once at start.

Unknown keys are errors that name the key (`grpc.listn`), like the agent's config. Not for runtime state.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator

from cloud_sync.certificates import CertificateProblem, FleetCA, ServerTls
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
    enrollment_listen: OptionalAddress = Field(
        "",
        description="host:port serving only Enrollment, with server-side TLS, for devices that have no client "
        "certificate yet; needed (only) with tls.client_ca_file.",
    )


class HttpSection(_Section):
    listen: ListenAddress = Field("127.0.0.1:8080", description="host:port of the admin API (fleetctl) and /metrics.")
    max_body_bytes: int = Field(
        1024 * 1024, ge=1024, le=2**31 - 1, description="Largest request body the admin API reads; larger: 413."
    )


def _database_url(value: str) -> str:
    """The URLs open_database serves (cloud_sync/store/database.py), refused here so check-config refuses them."""
    if not value:
        return value
    import sqlalchemy as sa
    from sqlalchemy import exc as sa_exc

    try:
        url = sa.make_url(value)
    except sa_exc.ArgumentError:
        raise ValueError("not a database URL: use sqlite:///path.db or postgresql+psycopg://user@host/db") from None
    backend = url.get_backend_name()
    if backend == "sqlite":
        if url.database in (None, "", ":memory:") or (url.database or "").startswith("file::memory:"):
            raise ValueError("in-memory SQLite is not supported (each connection would see its own): use a file")
    elif backend == "postgresql":
        if url.drivername not in ("postgresql", "postgres", "postgresql+psycopg"):
            raise ValueError(f"unsupported PostgreSQL driver {url.drivername!r}: use postgresql+psycopg://")
    else:
        raise ValueError(f"unsupported database {backend!r}: use a sqlite:/// or postgresql+psycopg:// URL")
    return value


class DatabaseSection(_Section):
    url: Annotated[str, AfterValidator(_database_url)] = Field(
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
    url: OptionalBrokerUrl = Field(
        "", description="MQTT broker (mqtt://host:port); empty: no telemetry or presence ingest."
    )
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

    @model_validator(mode="after")
    def _accounts_need_a_broker(self) -> MqttSection:
        if self.manage_accounts != "none" and not self.url:
            raise ValueError(f"mqtt.manage_accounts = {self.manage_accounts} needs mqtt.url (the broker to manage)")
        return self


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


class TlsSection(_Section):
    cert_file: str = Field(
        "",
        description="PEM certificate (chain) of cloud-sync's gRPC port and admin API; empty (with key_file): "
        "plaintext, for loopback or behind a TLS-terminating proxy.",
    )
    key_file: str = Field("", description="PEM private key of cert_file (unencrypted, mode 0600).")
    client_ca_file: str = Field(
        "",
        description="PEM CA bundle device client certificates must chain to: the gRPC port then requires one "
        "(mTLS) on top of the device token, and Enrollment moves to grpc.enrollment_listen; empty: none asked.",
    )

    @model_validator(mode="after")
    def _readable(self) -> TlsSection:
        if bool(self.cert_file) != bool(self.key_file):
            raise ValueError("tls.cert_file and tls.key_file: set both, or neither")
        if self.client_ca_file and not self.cert_file:
            raise ValueError("tls.client_ca_file needs tls.cert_file and tls.key_file: client certificates need TLS")
        if self.cert_file:
            _check_files(lambda: ServerTls.read(self.cert_file, self.key_file, self.client_ca_file))
        return self


class FleetCaSection(_Section):
    cert_file: str = Field(
        "",
        description="PEM certificate of the CA that signs device client certificates at enrollment (the broker's "
        "cafile for devices); empty (with key_file): devices get no certificate.",
    )
    key_file: str = Field("", description="PEM private key of that CA (unencrypted, mode 0600).")
    validity_days: int = Field(
        90, ge=1, le=3650, description="How long an issued device certificate is valid (capped at the CA's own)."
    )

    @model_validator(mode="after")
    def _readable(self) -> FleetCaSection:
        if bool(self.cert_file) != bool(self.key_file):
            raise ValueError("fleet_ca.cert_file and fleet_ca.key_file: set both, or neither")
        if self.cert_file:
            _check_files(lambda: FleetCA.read(self.cert_file, self.key_file, self.validity_days))
        return self


def _check_files(read: Callable[[], object]) -> None:
    # The message names the full key itself (`tls.key_file: ...`: certificates.py knows which file failed);
    # config_from_dict then leaves out the section pydantic would put before it.
    try:
        read()
    except CertificateProblem as exc:
        raise ValueError(exc.message) from None


class CloudSyncConfig(_Section):
    server: ServerSection = ServerSection()
    grpc: GrpcSection = GrpcSection()
    http: HttpSection = HttpSection()
    database: DatabaseSection = DatabaseSection()
    mqtt: MqttSection = MqttSection()
    registry: RegistrySection = RegistrySection()
    rollouts: RolloutsSection = RolloutsSection()
    tls: TlsSection = TlsSection()
    fleet_ca: FleetCaSection = FleetCaSection()

    @model_validator(mode="after")
    def _enrollment_reachable(self) -> CloudSyncConfig:
        # With client certificates required on grpc.listen, a device that has none yet could never enroll.
        if self.tls.client_ca_file and not self.grpc.enrollment_listen:
            raise ValueError(
                "tls.client_ca_file requires client certificates on grpc.listen, where devices without one cannot "
                "enroll: set grpc.enrollment_listen (a port serving Enrollment with server-side TLS only)"
            )
        if self.grpc.enrollment_listen and not self.tls.client_ca_file:
            raise ValueError("grpc.enrollment_listen is only for tls.client_ca_file (mTLS on grpc.listen)")
        return self

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
        if key and message.startswith(f"{key}."):  # the message names the key already
            raise ConfigProblem(f"{source}: {message}") from None
        raise ConfigProblem(f"{source}: {key}: {message}" if key else f"{source}: {message}") from None


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
