"""deploy/mosquitto/edgefleet.conf itself, run by a real Mosquitto: devices over TLS with client certificates
(the certificate names the device), cloud-sync with a password, and the generated ACL between them."""

from __future__ import annotations

import datetime
import ipaddress
import shutil
import socket
import ssl
import subprocess
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from paho.mqtt.client import Client
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from cloud_sync.store import Database, DeviceRegistry
from cloud_sync.store.telemetry import TelemetryStore
from cloud_sync.telemetry.acl import write_fleet_acl
from tests.cloud_sync.telemetry.conftest import PREFIX, MakeSubscriber, telemetry
from tests.mosquitto import Mosquitto, free_port
from tests.waiting import wait_for

DEPLOY_CONF = Path(__file__).resolve().parents[3] / "deploy" / "mosquitto" / "edgefleet.conf"
MOSQUITTO_PASSWD = shutil.which("mosquitto_passwd")


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _cert(
    name: str, key: ec.EllipticCurvePrivateKey, issuer: x509.Name | None, issuer_key: ec.EllipticCurvePrivateKey
) -> x509.Certificate:
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer or subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=issuer is None, path_length=None), critical=True)
    )
    if name == "127.0.0.1":
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
    return builder.sign(issuer_key, hashes.SHA256())


def _write(directory: Path, name: str, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> tuple[Path, Path]:
    cert_path, key_path = directory / f"{name}.pem", directory / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert_path, key_path


def deployed_config(tls_port: int, plain_port: int, paths: dict[str, Path]) -> str:
    """The deploy file with this test's ports and file paths (nothing else changed)."""
    text = DEPLOY_CONF.read_text()
    replacements = {
        "listener 8883": f"listener {tls_port} 127.0.0.1",
        "listener 1883 127.0.0.1": f"listener {plain_port} 127.0.0.1",
        "/etc/mosquitto/certs/fleet-ca.pem": str(paths["ca"]),
        "/etc/mosquitto/certs/broker.pem": str(paths["broker_cert"]),
        "/etc/mosquitto/certs/broker.key": str(paths["broker_key"]),
        "/etc/mosquitto/edgefleet.passwd": str(paths["passwd"]),
        "/etc/mosquitto/edgefleet.acl": str(paths["acl"]),
        "/var/lib/mosquitto/": f"{paths['data']}/",
    }
    for old, new in replacements.items():
        assert old in text, f"{old!r} is no longer in {DEPLOY_CONF}: update this test"
        text = text.replace(old, new)
    return text


@pytest.mark.skipif(MOSQUITTO_PASSWD is None, reason="mosquitto_passwd is not installed")
def test_the_deployment_config_confines_certificate_identified_devices(
    tmp_path: Path, sqlite_db: Database, make_subscriber: MakeSubscriber
) -> None:
    assert MOSQUITTO_PASSWD is not None
    certs = tmp_path / "certs"
    certs.mkdir()
    ca_key = _key()
    ca = _cert("edgefleet test CA", ca_key, None, ca_key)
    ca_path, _ = _write(certs, "ca", ca, ca_key)
    broker_key = _key()
    broker_cert, broker_key_path = _write(
        certs, "broker", _cert("127.0.0.1", broker_key, ca.subject, ca_key), broker_key
    )
    device_key = _key()
    device_cert, device_key_path = _write(certs, "cam-1", _cert("cam-1", device_key, ca.subject, ca_key), device_key)
    passwd = tmp_path / "edgefleet.passwd"
    subprocess.run([MOSQUITTO_PASSWD, "-c", "-b", str(passwd), "cloud-sync", "pw-cloud"], check=True)
    acl = tmp_path / "edgefleet.acl"
    write_fleet_acl(acl, DeviceRegistry(sqlite_db))
    data = tmp_path / "data"
    data.mkdir()
    tls_port = free_port()
    paths = {"ca": ca_path, "broker_cert": broker_cert, "broker_key": broker_key_path, "passwd": passwd, "acl": acl}
    # The deploy file as it is, but for ports and paths; its password listener is the helper's port.
    broker = Mosquitto(
        tmp_path / "broker", lambda port: deployed_config(tls_port, port, {**paths, "data": data}), listener=False
    )
    store = TelemetryStore(sqlite_db)
    with broker:
        subscriber = make_subscriber(store, broker, username="cloud-sync", password="pw-cloud")
        device = Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id="edge-cam-1",
            protocol=MQTTProtocolVersion.MQTTv5,
        )
        device.tls_set(
            ca_certs=str(ca_path), certfile=str(device_cert), keyfile=str(device_key_path), cert_reqs=ssl.CERT_REQUIRED
        )
        device.connect("127.0.0.1", tls_port)
        device.loop_start()
        try:
            wait_for(device.is_connected, 10, "the device to connect over TLS with its certificate")
            forged = device.publish(
                f"{PREFIX}/devices/cam-2/telemetry", telemetry("cam-2", 1).SerializeToString(), qos=1
            )
            forged.wait_for_publish(10)
            own = device.publish(f"{PREFIX}/devices/cam-1/telemetry", telemetry("cam-1", 1).SerializeToString(), qos=1)
            own.wait_for_publish(10)
            wait_for(lambda: store.latest("cam-1") is not None, 10, "cam-1's telemetry, identified by its certificate")
            assert store.latest("cam-2") is None and subscriber.stats().received == 1
        finally:
            device.disconnect()
            device.loop_stop()
        # Without a client certificate there is no session at all (require_certificate): TLS 1.3 reports it
        # on the first read after the handshake, TLS 1.2 in the handshake itself.
        context = ssl.create_default_context(cafile=str(ca_path))
        with (
            socket.create_connection(("127.0.0.1", tls_port), timeout=10) as raw,
            pytest.raises(ssl.SSLError),
            context.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
        ):
            tls.sendall(b"\x10\x00")
            tls.recv(1)
        subscriber.close(end_session=True)
