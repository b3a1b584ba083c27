"""deploy/mosquitto/edgefleet.conf itself, run by a real Mosquitto: devices over TLS with client certificates
(the certificate names the device), cloud-sync with a password, and the generated ACL between them."""

from __future__ import annotations

import datetime
import ipaddress
import shutil
import socket
import ssl
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
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
from tests.cloud_sync.telemetry.test_acl import connack
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


def deployed_config(tls_port: int, plain_port: int, paths: dict[str, Path], *, drop: tuple[str, ...] = ()) -> str:
    """The deploy file with this test's ports and file paths (nothing else changed, but the `drop`ped lines)."""
    text = DEPLOY_CONF.read_text()
    replacements = {
        "listener 8883": f"listener {tls_port} 127.0.0.1",
        "listener 1883 127.0.0.1": f"listener {plain_port} 127.0.0.1",
        "/etc/mosquitto/certs/fleet-ca.pem": str(paths["ca"]),
        "/etc/mosquitto/certs/broker.pem": str(paths["broker_cert"]),
        "/etc/mosquitto/certs/broker.key": str(paths["broker_key"]),
        "/etc/mosquitto/cloud-sync.passwd": str(paths["passwd"]),
        "/etc/mosquitto/edgefleet.acl": str(paths["acl"]),
        "/var/lib/mosquitto/": f"{paths['data']}/",
    }
    for old, new in replacements.items():
        assert old in text, f"{old!r} is no longer in {DEPLOY_CONF}: update this test"
        text = text.replace(old, new)
    for line in drop:
        assert f"\n{line}\n" in text, line
        text = text.replace(f"\n{line}\n", "\n")
    return text


@dataclass
class Deployed:
    """A broker running the deploy file, the fleet CA, and a way to connect devices with certificates."""

    broker: Mosquitto
    tls_port: int
    certs: Path
    ca: x509.Certificate
    ca_key: ec.EllipticCurvePrivateKey
    cloud_password: str = "pw-cloud"

    @property
    def ca_path(self) -> Path:
        return self.certs / "ca.pem"

    def device(self, name: str, client_id: str | None = None) -> TlsDevice:
        key = _key()
        cert, key_path = _write(self.certs, name, _cert(name, key, self.ca.subject, self.ca_key), key)
        return TlsDevice(self, cert, key_path, client_id or name)


class TlsDevice:
    """A device connecting over TLS with its certificate; counts its connects and disconnects."""

    def __init__(self, deployed: Deployed, cert: Path, key: Path, client_id: str) -> None:
        self.connects = self.disconnects = 0
        self.client = Client(
            callback_api_version=CallbackAPIVersion.VERSION2, client_id=client_id, protocol=MQTTProtocolVersion.MQTTv5
        )
        self.client.tls_set(
            ca_certs=str(deployed.ca_path), certfile=str(cert), keyfile=str(key), cert_reqs=ssl.CERT_REQUIRED
        )
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.reconnect_delay_set(60, 60)  # a device knocked off stays off: the test counts it once

    def _on_connect(self, *_args: object) -> None:
        self.connects += 1

    def _on_disconnect(self, *_args: object) -> None:
        self.disconnects += 1

    def start(self, tls_port: int, *, status_topic: str = "") -> TlsDevice:
        if status_topic:
            self.client.will_set(status_topic, b"offline", qos=1, retain=True)
        self.client.connect("127.0.0.1", tls_port)
        self.client.loop_start()
        wait_for(lambda: self.connects, 10, "the device to connect over TLS with its certificate")
        if status_topic:
            self.client.publish(status_topic, b"online", qos=1, retain=True).wait_for_publish(10)
        return self

    def publish(self, topic: str, payload: bytes) -> None:
        self.client.publish(topic, payload, qos=1).wait_for_publish(10)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def deploy(tmp_path: Path, sqlite_db: Database) -> Iterator[Callable[..., Deployed]]:
    """deploy(drop=...) -> the deploy file running in a real Mosquitto (stopped at teardown)."""
    assert MOSQUITTO_PASSWD is not None
    started: list[Mosquitto] = []

    def start(drop: tuple[str, ...] = ()) -> Deployed:
        certs = tmp_path / "certs"
        certs.mkdir()
        ca_key = _key()
        ca = _cert("edgefleet test CA", ca_key, None, ca_key)
        ca_path, _ = _write(certs, "ca", ca, ca_key)
        broker_key = _key()
        broker_cert, broker_key_path = _write(
            certs, "broker", _cert("127.0.0.1", broker_key, ca.subject, ca_key), broker_key
        )
        passwd = tmp_path / "cloud-sync.passwd"
        subprocess.run([str(MOSQUITTO_PASSWD), "-c", "-b", str(passwd), "cloud-sync", "pw-cloud"], check=True)
        acl = tmp_path / "edgefleet.acl"
        write_fleet_acl(acl, DeviceRegistry(sqlite_db))
        data = tmp_path / "data"
        data.mkdir()
        tls_port = free_port()
        paths = {"ca": ca_path, "broker_cert": broker_cert, "broker_key": broker_key_path, "passwd": passwd, "acl": acl}
        # The deploy file as it is, but for ports and paths; its password listener is the helper's port.
        broker = Mosquitto(
            tmp_path / "broker",
            lambda port: deployed_config(tls_port, port, {**paths, "data": data}, drop=drop),
            listener=False,
        )
        broker.start()
        started.append(broker)
        return Deployed(broker, tls_port, certs, ca, ca_key)

    yield start
    for broker in started:
        broker.stop()


@pytest.mark.skipif(MOSQUITTO_PASSWD is None, reason="mosquitto_passwd is not installed")
def test_the_deployment_config_confines_certificate_identified_devices(
    deploy: Callable[..., Deployed], sqlite_db: Database, make_subscriber: MakeSubscriber
) -> None:
    deployed = deploy()
    store = TelemetryStore(sqlite_db)
    subscriber = make_subscriber(store, deployed.broker, username="cloud-sync", password=deployed.cloud_password)
    device = deployed.device("cam-1").start(deployed.tls_port)
    try:
        device.publish(f"{PREFIX}/devices/cam-2/telemetry", telemetry("cam-2", 1).SerializeToString())
        device.publish(f"{PREFIX}/devices/cam-1/telemetry", telemetry("cam-1", 1).SerializeToString())
        wait_for(lambda: store.latest("cam-1") is not None, 10, "cam-1's telemetry, identified by its certificate")
        assert store.latest("cam-2") is None and subscriber.stats().received == 1
    finally:
        device.close()
    # Without a client certificate there is no session at all (require_certificate): TLS 1.3 reports it
    # on the first read after the handshake, TLS 1.2 in the handshake itself.
    context = ssl.create_default_context(cafile=str(deployed.ca_path))
    with (
        socket.create_connection(("127.0.0.1", deployed.tls_port), timeout=10) as raw,
        pytest.raises(ssl.SSLError),
        context.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
    ):
        tls.sendall(b"\x10\x00")
        tls.recv(1)
    # A device's credentials are no good where cloud-sync logs in: that listener knows cloud-sync's users only.
    assert connack(deployed.broker, "cam-1", "any password") != "Success"
    subscriber.close(end_session=True)


@pytest.mark.skipif(MOSQUITTO_PASSWD is None, reason="mosquitto_passwd is not installed")
@pytest.mark.parametrize("bound", [True, False], ids=["as-deployed", "without-use_username_as_clientid"])
def test_a_device_using_another_clients_id_disturbs_nobody(
    deploy: Callable[..., Deployed], sqlite_db: Database, make_subscriber: MakeSubscriber, bound: bool
) -> None:
    """cam-1 connects with cam-2's client id, then with cloud-sync's. As deployed, the broker makes it cam-1:
    cam-2 and cloud-sync stay connected and cam-2's last will never fires. Without the binding (the control
    that shows this test can fail) the broker hands cam-1 both victims' sessions."""
    deployed = deploy(drop=() if bound else ("use_username_as_clientid true",))
    store = TelemetryStore(sqlite_db)
    subscriber = make_subscriber(
        store, deployed.broker, client_id="cloud-sync-0", username="cloud-sync", password=deployed.cloud_password
    )
    cam2 = deployed.device("cam-2").start(deployed.tls_port, status_topic=f"{PREFIX}/devices/cam-2/status")
    wait_for(lambda: [p.online for p in store.fleet_presence()] == [True], 10, "cam-2 online")
    try:
        for number, stolen in enumerate(("cam-2", "cloud-sync-0"), 1):
            thief = deployed.device("cam-1", client_id=stolen).start(deployed.tls_port)
            try:
                # Its own telemetry, published after the takeover would have happened: once it is stored, a
                # last will fired by the takeover (published before it) would have been stored too.
                thief.publish(f"{PREFIX}/devices/cam-1/telemetry", telemetry("cam-1", number).SerializeToString())
                wait_for(
                    lambda n=number: _seq(store, "cam-1") == n or not subscriber.connected, 10, "cam-1's telemetry"
                )
            finally:
                thief.close()
            if not bound:
                break
        disturbed = cam2.disconnects > 0 or not cam2.client.is_connected()
        presence = {p.device_id: p.online for p in store.fleet_presence()}
        if bound:
            assert not disturbed and cam2.connects == 1
            assert presence == {"cam-2": True, "cam-1": True}  # no last will fired for cam-2
            assert subscriber.stats().connects == 1 and subscriber.connected
            assert _seq(store, "cam-1") == 2
        else:
            assert disturbed and presence["cam-2"] is False  # knocked off, its last will read "offline"
    finally:
        cam2.close()
    subscriber.close(end_session=True)


def _seq(store: TelemetryStore, device_id: str) -> int:
    latest = store.latest(device_id)
    return int(latest.message.seq) if latest is not None else 0
