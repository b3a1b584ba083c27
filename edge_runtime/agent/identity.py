"""The device's identity from enrollment: who it is, its credential, the fleet key, where the cloud is.

`edge-agent enroll` writes `{data_dir}/identity/`: device.json (device id, endpoints, labels, when, key id),
device-token and fleet-signing.pub (raw 32 bytes); when the fleet issues certificates also client.key (the
device's own EC key, made on the device), client.pem (its certificate, CN = the device id) and fleet-ca.pem
(the CA that signed it); and server-ca.pem, the CA bundle enrollment trusted (--ca-file). Each 0600 and
written atomically, device.json last (its presence means the set is complete). `apply_identity` fills the
config keys the config file leaves empty from it; a value set in the config wins. Not the enrollment call
itself (agent/enroll.py).
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edge_runtime.config import AgentConfig, MqttSection
from edge_runtime.errors import ConfigError
from edgefleet.addresses import AddressError, parse_broker_url, parse_host_port
from edgefleet.durable import write_atomic
from edgefleet.signing import key_id

__all__ = [
    "CLIENT_CERT_FILE",
    "CLIENT_KEY_FILE",
    "DEVICE_FILE",
    "FLEET_CA_FILE",
    "IDENTITY_DIR",
    "KEY_FILE",
    "SERVER_CA_FILE",
    "TOKEN_FILE",
    "ClientCertificate",
    "Identity",
    "apply_identity",
    "client_certificate_expiry",
    "identity_dir",
]

IDENTITY_DIR = "identity"
DEVICE_FILE = "device.json"
TOKEN_FILE = "device-token"
KEY_FILE = "fleet-signing.pub"
CLIENT_KEY_FILE = "client.key"
CLIENT_CERT_FILE = "client.pem"
FLEET_CA_FILE = "fleet-ca.pem"
SERVER_CA_FILE = "server-ca.pem"
_PEM_CERTIFICATE = b"-----BEGIN CERTIFICATE-----"
SIGNING_KEY_BYTES = 32
# A device.json is a few hundred bytes; anything much larger is not one.
_MAX_DEVICE_FILE_BYTES = 256 * 1024
_MAX_TOKEN_CHARS = 128
# Device ids appear in MQTT topics and file names (the cloud's alphabet, cloud_sync/store/devices.py).
_DEVICE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_MODE = 0o600


def identity_dir(data_dir: Path) -> Path:
    return data_dir / IDENTITY_DIR


@dataclass(frozen=True)
class ClientCertificate:
    """The device's TLS client credential as enrollment got it: its key (PEM, made on the device), the
    certificate the fleet CA issued for it, and that CA (PEM)."""

    key_pem: bytes
    cert_pem: bytes
    ca_pem: bytes


@dataclass(frozen=True)
class Identity:
    """A validated identity; `directory` is where its files are."""

    directory: Path
    device_id: str
    grpc_target: str
    mqtt_url: str
    topic_prefix: str
    labels: dict[str, str]
    enrolled_at_ms: int
    key_id: str
    client_certificate: bool = False  # client.key, client.pem and fleet-ca.pem are there
    server_ca: bool = False  # server-ca.pem is there

    @property
    def token_file(self) -> Path:
        return self.directory / TOKEN_FILE

    @property
    def client_cert_file(self) -> Path:
        return self.directory / CLIENT_CERT_FILE

    @property
    def client_key_file(self) -> Path:
        return self.directory / CLIENT_KEY_FILE

    @property
    def fleet_ca_file(self) -> Path:
        return self.directory / FLEET_CA_FILE

    @property
    def server_ca_file(self) -> Path:
        return self.directory / SERVER_CA_FILE

    @property
    def signing_key_file(self) -> Path:
        return self.directory / KEY_FILE

    @classmethod
    def load(cls, data_dir: Path) -> Identity | None:
        """The identity in `data_dir`, or None when the device was never enrolled.

        Raises ConfigError naming the file for a damaged one (`edge-agent enroll --force` writes a new one);
        an OSError (permissions, I/O) as it is: a runtime failure, not bad input.
        """
        directory = identity_dir(data_dir)
        path = directory / DEVICE_FILE
        try:
            raw = path.read_bytes()[: _MAX_DEVICE_FILE_BYTES + 1]
        except (FileNotFoundError, NotADirectoryError):
            return None  # never enrolled (a data dir that is no directory fails where it is used, exit 1)
        identity = _parse_device_file(path, raw, directory)
        _check_token_file(identity.token_file)
        key = _read_key(identity.signing_key_file)
        if key_id(key) != identity.key_id:
            raise ConfigError(
                f"{identity.signing_key_file} is not the fleet key {identity.key_id} that {path} names: the identity "
                "is damaged; enroll the device again (edge-agent enroll --force)"
            )
        for present, path in (
            (identity.client_certificate, identity.client_key_file),
            (identity.client_certificate, identity.client_cert_file),
            (identity.client_certificate, identity.fleet_ca_file),
            (identity.server_ca, identity.server_ca_file),
        ):
            if present and not path.is_file():
                raise _damaged(path, "the file device.json names is missing")
        return identity

    @classmethod
    def save(
        cls,
        data_dir: Path,
        *,
        device_id: str,
        device_token: str,
        signing_key: bytes,
        grpc_target: str,
        mqtt_url: str,
        topic_prefix: str,
        labels: dict[str, str],
        enrolled_at_ms: int,
        client_certificate: ClientCertificate | None = None,
        server_ca_pem: bytes = b"",
    ) -> Identity:
        """Write the identity files (0600, each atomically; device.json last) and return the identity.

        Files of an earlier identity this one has not (a certificate, the server CA) are removed first."""
        directory = identity_dir(data_dir)
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        document = {
            "device_id": device_id,
            "endpoints": {"grpc_target": grpc_target, "mqtt_url": mqtt_url, "topic_prefix": topic_prefix},
            "labels": dict(labels),
            "enrolled_at_ms": enrolled_at_ms,
            "key_id": key_id(signing_key),
            "client_certificate": client_certificate is not None,
            "server_ca": bool(server_ca_pem),
        }
        data = json.dumps(document, indent=2, sort_keys=True).encode() + b"\n"
        identity = _parse_device_file(directory / DEVICE_FILE, data, directory)  # what load would accept
        (directory / DEVICE_FILE).unlink(missing_ok=True)  # incomplete until written again, last
        files = {
            TOKEN_FILE: device_token.encode() + b"\n",
            KEY_FILE: signing_key,
            CLIENT_KEY_FILE: client_certificate.key_pem if client_certificate else None,
            CLIENT_CERT_FILE: client_certificate.cert_pem if client_certificate else None,
            FLEET_CA_FILE: client_certificate.ca_pem if client_certificate else None,
            SERVER_CA_FILE: server_ca_pem or None,
        }
        for name, content in files.items():
            if content is None:
                (directory / name).unlink(missing_ok=True)
            else:
                write_atomic(directory / name, content, mode=_MODE)
        write_atomic(directory / DEVICE_FILE, data, mode=_MODE)
        return identity


def _damaged(path: Path, problem: str) -> ConfigError:
    return ConfigError(f"the device identity {path} is damaged ({problem}): enroll the device again (--force)")


def _parse_device_file(path: Path, raw: bytes, directory: Path) -> Identity:
    if len(raw) > _MAX_DEVICE_FILE_BYTES:
        raise _damaged(path, f"larger than {_MAX_DEVICE_FILE_BYTES} bytes")
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise _damaged(path, f"not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise _damaged(path, "not a JSON object")
    device_id = data.get("device_id")
    if not isinstance(device_id, str) or not _DEVICE_ID.fullmatch(device_id):
        raise _damaged(path, f"device_id {device_id!r} is not a device id")
    endpoints = data.get("endpoints")
    if not isinstance(endpoints, dict):
        raise _damaged(path, "endpoints is not an object")
    grpc_target, mqtt_url, prefix = (_text(path, endpoints, k) for k in ("grpc_target", "mqtt_url", "topic_prefix"))
    try:
        if grpc_target:
            parse_host_port(grpc_target)
        if mqtt_url:
            parse_broker_url(mqtt_url)
    except AddressError as exc:
        raise _damaged(path, str(exc)) from None
    labels = data.get("labels", {})
    if not isinstance(labels, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in labels.items()):
        raise _damaged(path, "labels is not an object of strings")
    enrolled = data.get("enrolled_at_ms")
    if not isinstance(enrolled, int) or isinstance(enrolled, bool) or enrolled < 0:
        raise _damaged(path, "enrolled_at_ms is not a time in ms")
    fleet_key_id = data.get("key_id")
    if not isinstance(fleet_key_id, str) or not re.fullmatch(r"[0-9a-f]{16}", fleet_key_id):
        raise _damaged(path, "key_id is not 16 hex digits")
    flags = {name: data.get(name, False) for name in ("client_certificate", "server_ca")}  # absent: older identity
    for name, value in flags.items():
        if not isinstance(value, bool):
            raise _damaged(path, f"{name} is not true or false")
    return Identity(
        directory,
        device_id,
        grpc_target,
        mqtt_url,
        prefix,
        dict(labels),
        enrolled,
        fleet_key_id,
        client_certificate=flags["client_certificate"],
        server_ca=flags["server_ca"],
    )


def _text(path: Path, table: dict[str, Any], key: str) -> str:
    value = table.get(key, "")
    if not isinstance(value, str) or len(value) > 1024 or not value.isprintable():
        raise _damaged(path, f"endpoints.{key} is not a line of text")
    return value


def _check_token_file(path: Path) -> None:
    try:
        token = path.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        raise _damaged(path, "the device token file is missing") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read the device token {path}: {getattr(exc, 'strerror', None) or exc}") from exc
    if not token or len(token) > _MAX_TOKEN_CHARS or not (token.isascii() and token.isprintable()):
        raise _damaged(path, "it holds no device token")


def _read_key(path: Path) -> bytes:
    try:
        key = path.read_bytes()
    except FileNotFoundError:
        raise _damaged(path, "the fleet signing key is missing") from None
    except OSError as exc:
        raise ConfigError(f"cannot read the fleet signing key {path}: {exc.strerror}") from exc
    if len(key) != SIGNING_KEY_BYTES:
        raise _damaged(path, f"a fleet signing key is {SIGNING_KEY_BYTES} raw bytes, not {len(key)}")
    return key


def apply_identity(config: AgentConfig, identity: Identity | None = None) -> AgentConfig:
    """`config` with the keys it leaves empty taken from the enrolled identity (loaded from its data dir).

    Fills cloud.device_id, cloud.token_file, cloud.grpc_target, cloud.signing_key_file, mqtt.url, and
    mqtt.topic_prefix while the config keeps the default prefix; cloud.ca_file with the CA bundle enrollment
    trusted, and cloud.client_cert_file and client_key_file with the certificate the fleet issued (only while
    the config names neither of the two, and the broker, if any, is mqtts://). Without an identity, `config` as it is.
    A cloud.device_id set in the config that differs from the identity's is a ConfigError: the token
    would belong to another device.
    """
    identity = identity or Identity.load(config.data_dir)
    if identity is None:
        return config
    cloud, mqtt = config.cloud, config.mqtt
    if cloud.device_id and cloud.device_id != identity.device_id:
        raise ConfigError(
            f"cloud.device_id is {cloud.device_id!r} but this data dir is enrolled as {identity.device_id!r} "
            f"({identity.directory / DEVICE_FILE}): remove cloud.device_id from the config, or enroll again"
        )
    own_certificate = bool(cloud.client_cert_file or cloud.client_key_file)
    mqtt_url = mqtt.url or identity.mqtt_url
    # Not to a plaintext broker (mqtt://), where a certificate is a config error (sync/mqtt.py).
    issued = identity.client_certificate and not own_certificate and not mqtt_url.startswith("mqtt://")
    cloud = dataclasses.replace(
        cloud,
        device_id=identity.device_id,
        token_file=cloud.token_file or str(identity.token_file),
        grpc_target=cloud.grpc_target or identity.grpc_target,
        signing_key_file=cloud.signing_key_file or str(identity.signing_key_file),
        ca_file=cloud.ca_file or (str(identity.server_ca_file) if identity.server_ca else ""),
        client_cert_file=str(identity.client_cert_file) if issued else cloud.client_cert_file,
        client_key_file=str(identity.client_key_file) if issued else cloud.client_key_file,
    )
    default_prefix = MqttSection().topic_prefix
    mqtt = dataclasses.replace(
        mqtt,
        url=mqtt_url,
        topic_prefix=identity.topic_prefix
        if mqtt.topic_prefix == default_prefix and identity.topic_prefix
        else mqtt.topic_prefix,
    )
    return dataclasses.replace(config, cloud=cloud, mqtt=mqtt)


def client_certificate_expiry(data_dir: Path) -> datetime.datetime | None:
    """When the client certificate enrollment issued expires (UTC), or None when the device has none.

    For `edge-agent doctor`; a certificate that cannot be read is a ConfigError naming the file."""
    path = identity_dir(data_dir) / CLIENT_CERT_FILE
    try:
        data = path.read_bytes()
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as exc:
        raise ConfigError(f"cannot read the client certificate {path}: {exc.strerror}") from exc
    from cryptography import x509  # here: the agent's start does not pay for the X.509 parser

    try:
        certificate = x509.load_pem_x509_certificate(data)
    except ValueError:
        raise _damaged(path, "not a PEM certificate") from None
    return certificate.not_valid_after_utc
