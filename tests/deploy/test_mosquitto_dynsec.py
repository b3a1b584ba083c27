"""deploy/mosquitto/edgefleet-dynsec.conf run by a real Mosquitto (ports and paths moved into the test's
directory, nothing else changed): both listeners come up; cloud-sync's own account code (DynsecAccounts) makes
a device's account; the device gets in over TLS with its fleet certificate and token, and stays out without a
certificate, with a wrong token, or once its account is disabled (a revocation)."""

from __future__ import annotations

import shutil
import socket
import ssl
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from paho.mqtt.client import Client
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from cloud_sync.broker_accounts import DynsecAccounts
from tests.deploy.units import MOSQUITTO
from tests.mosquitto import MOSQUITTO as MOSQUITTO_BINARY
from tests.mosquitto import Mosquitto, free_port
from tests.tls.pki import Authority, Pki
from tests.waiting import wait_for

CONF = MOSQUITTO / "edgefleet-dynsec.conf"
PLUGIN = "/usr/lib/x86_64-linux-gnu/mosquitto_dynamic_security.so"
MOSQUITTO_CTRL = shutil.which("mosquitto_ctrl")
PREFIX = "edgefleet/v1"
ADMIN_PASSWORD = "admin-password-for-the-test"

pytestmark = pytest.mark.skipif(
    not (Path(MOSQUITTO_BINARY).exists() and Path(PLUGIN).exists() and MOSQUITTO_CTRL),
    reason="needs mosquitto, mosquitto_ctrl and the dynamic security plugin (Debian packages mosquitto, "
    "mosquitto-clients)",
)


@dataclass
class Broker:
    broker: Mosquitto
    tls_port: int
    pki: Pki
    fleet_ca: Authority


def deployed_config(plain_port: int, tls_port: int, paths: dict[str, Path]) -> str:
    text = CONF.read_text()
    replacements = {
        "listener 8883": f"listener {tls_port} 127.0.0.1",
        "listener 1883 127.0.0.1": f"listener {plain_port} 127.0.0.1",
        "/etc/mosquitto/certs/fleet-ca.pem": str(paths["ca"]),
        "/etc/mosquitto/certs/broker.pem": str(paths["cert"]),
        "/etc/mosquitto/certs/broker.key": str(paths["key"]),
        "/var/lib/mosquitto/dynamic-security.json": str(paths["dynsec"]),
        "/var/lib/mosquitto/": f"{paths['data']}/",
    }
    for old, new in replacements.items():
        assert old in text, f"{old!r} is no longer in {CONF}: update this test"
        text = text.replace(old, new)
    assert f"plugin {PLUGIN}\n" in text
    return text


@pytest.fixture
def deployed(tmp_path: Path) -> Iterator[Broker]:
    pki = Pki(tmp_path / "certs")
    fleet_ca = pki.ca("fleet-ca")
    cert, key = pki.server(fleet_ca, "broker")
    data = tmp_path / "data"
    data.mkdir()
    dynsec = data / "dynamic-security.json"
    # As docs/install.md does before the first start.
    assert MOSQUITTO_CTRL is not None
    subprocess.run(
        [MOSQUITTO_CTRL, "dynsec", "init", str(dynsec), "cloud-sync", ADMIN_PASSWORD],
        check=True,
        capture_output=True,
        timeout=60,
    )
    paths = {"ca": fleet_ca.cert_file, "cert": cert, "key": key, "dynsec": dynsec, "data": data}
    tls_port = free_port()
    broker = Mosquitto(tmp_path / "broker", lambda port: deployed_config(port, tls_port, paths), listener=False).start()
    try:
        wait_for(lambda: _accepts(tls_port), 10, "the device listener (TLS)")
        yield Broker(broker, tls_port, pki, fleet_ca)
    finally:
        broker.stop()


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


def tls_connack(deployed: Broker, username: str, password: str, cert: tuple[Path, Path]) -> str:
    """The reason code the device listener answers a TLS connection with this certificate and login."""
    reasons: list[str] = []
    client = Client(callback_api_version=CallbackAPIVersion.VERSION2, protocol=MQTTProtocolVersion.MQTTv5)
    client.username_pw_set(username, password)
    client.tls_set(ca_certs=str(deployed.fleet_ca.cert_file), certfile=str(cert[0]), keyfile=str(cert[1]))
    client.on_connect = lambda _c, _u, _f, reason, _p: reasons.append(str(reason))
    client.connect("127.0.0.1", deployed.tls_port)
    client.loop_start()
    try:
        return wait_for(lambda: reasons, 10, "the CONNACK")[0]
    finally:
        client.disconnect()
        client.loop_stop()


def test_the_dynsec_config_lets_in_enrolled_devices_only_with_certificate_and_token(deployed: Broker) -> None:
    accounts = DynsecAccounts(
        deployed.broker.url, prefix=PREFIX, username="cloud-sync", password=ADMIN_PASSWORD, client_id="cloud-sync-t"
    )
    accounts.start()
    try:
        accounts.create("cam-1", "efd_token-of-cam-1")  # what enrollment does
        certificate = deployed.pki.client(deployed.fleet_ca, "cam-1")
        assert tls_connack(deployed, "cam-1", "efd_token-of-cam-1", certificate) == "Success"
        assert tls_connack(deployed, "cam-1", "a wrong token", certificate) != "Success"
        # The certificate alone is no login: Mosquitto checks the password (use_identity_as_username false).
        assert tls_connack(deployed, "cam-2", "efd_token-of-cam-1", certificate) != "Success"
        accounts.disable("cam-1")  # what revocation does; the certificate stays valid
        assert tls_connack(deployed, "cam-1", "efd_token-of-cam-1", certificate) != "Success"
    finally:
        accounts.close()
    # No client certificate, no session (require_certificate true); TLS 1.3 reports it at the first read.
    context = ssl.create_default_context(cafile=str(deployed.fleet_ca.cert_file))
    with (
        socket.create_connection(("127.0.0.1", deployed.tls_port), timeout=10) as raw,
        pytest.raises(ssl.SSLError),
        context.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
    ):
        tls.sendall(b"\x10\x00")
        tls.recv(1)
