"""One fleet over TLS for the module: a CA made in the test, cloud-sync with [tls] (mTLS on its device port) and a
fleet CA, Mosquitto with a TLS listener requiring the fleet's client certificates, one enrolled agent process.

cloud-sync reaches the broker on a loopback password listener (deploy/mosquitto/edgefleet.conf's shape), where
it keeps device accounts in the dynamic-security plugin; the device reaches it on the TLS listener, named by
the certificate enrollment issued (use_identity_as_username).
"""

from __future__ import annotations

import os
import shutil
import ssl
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from cloud_sync.process import admin_token
from tests.cloud_sync.conftest import cloud_sync_config
from tests.fleet.harness import BROKER_ADMIN, DYNSEC_PLUGIN, FLEETCTL, FleetAgent, remove, short_socket_dir
from tests.mosquitto import MOSQUITTO, Mosquitto, free_port
from tests.processes import AGENT, REPO_ROOT, CloudSyncProcess, run_program
from tests.tls.pki import Authority, Pki

DEVICE = "cam-tls"


def _broker_missing() -> str:
    if not Path(MOSQUITTO).exists():
        return "mosquitto is not installed"
    if not Path(DYNSEC_PLUGIN).exists() or shutil.which("mosquitto_ctrl") is None:
        return "Mosquitto's dynamic security plugin (and mosquitto_ctrl) is not installed"
    return ""


@dataclass
class TlsFleet:
    """Everything the checks need: the CAs, the processes, and an admin API client trusting the server CA."""

    pki: Pki
    server_ca: Authority
    fleet_ca: Authority
    other_ca: Authority
    broker: Mosquitto
    broker_tls_port: int
    cloud: CloudSyncProcess
    ready: dict[str, Any]
    api: httpx.Client
    admin_token: str
    agent: FleetAgent
    enroll_stderr: str

    @property
    def grpc_target(self) -> str:
        return str(self.ready["grpc"])

    @property
    def enrollment_target(self) -> str:
        return str(self.ready["enrollment"])

    def fleetctl(self, *args: str | Path) -> subprocess.CompletedProcess[str]:
        """fleetctl over https, trusting the test's server CA the way an operator would (SSL_CERT_FILE)."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("FLEETCTL_")}
        env.update(
            FLEETCTL_URL=str(self.ready["http"]),
            FLEETCTL_TOKEN=self.admin_token,
            SSL_CERT_FILE=str(self.server_ca.cert_file),
            COLUMNS="250",
        )
        return subprocess.run(
            [*FLEETCTL, *map(str, args)], capture_output=True, text=True, timeout=120, cwd=REPO_ROOT, env=env
        )

    def ok(self, *args: str | Path) -> str:
        done = self.fleetctl(*args)
        assert done.returncode == 0, (args, done.returncode, done.stdout, done.stderr)
        return done.stdout

    def mint(self) -> str:
        token = self.ok("devices", "token", "create", "--labels", "site=lab", "--device-id", DEVICE).strip()
        assert token.startswith("efe_"), token
        return token

    def close(self) -> None:
        self.api.close()
        self.agent.kill()
        self.cloud.kill()
        self.broker.kill()


def _broker(directory: Path, fleet_ca: Authority, cert: Path, key: Path) -> tuple[Mosquitto, int, dict[str, Any]]:
    """Mosquitto: the loopback password listener for cloud-sync (dynsec), and a TLS listener for devices."""
    directory.mkdir(parents=True, exist_ok=True)
    dynsec = directory / "dynamic-security.json"
    password = "fleet-admin-password"
    subprocess.run(
        ["mosquitto_ctrl", "dynsec", "init", str(dynsec), BROKER_ADMIN, password], check=True, capture_output=True
    )
    (directory / "admin-password").write_text(password + "\n")
    tls_port = free_port()
    config = "\n".join(
        [
            f"plugin {DYNSEC_PLUGIN}",
            f"plugin_opt_config_file {dynsec}",
            f"listener {tls_port} 127.0.0.1",
            f"cafile {fleet_ca.cert_file}",
            f"certfile {cert}",
            f"keyfile {key}",
            "require_certificate true",
            "use_identity_as_username true",
            "use_username_as_clientid true",
        ]
    )
    broker = Mosquitto(directory, config, anonymous=False).start()
    mqtt = {
        "url": broker.url,
        "username": BROKER_ADMIN,
        "password_file": str(directory / "admin-password"),
        "manage_accounts": "mosquitto-dynsec",
        "device_url": f"mqtts://127.0.0.1:{tls_port}",
    }
    return broker, tls_port, mqtt


@pytest.fixture(scope="module")
def tls_fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsFleet]:
    if missing := _broker_missing():
        pytest.skip(missing)
    root = tmp_path_factory.mktemp("tls-fleet")
    sockets = short_socket_dir()
    pki = Pki(root / "pki")
    server_ca, fleet_ca, other_ca = pki.ca("server-ca"), pki.ca("fleet-ca"), pki.ca("other-ca")
    cloud_cert, cloud_key = pki.server(server_ca, "cloud-sync")
    broker_cert, broker_key = pki.server(server_ca, "broker")
    broker, tls_port, mqtt = _broker(root / "broker", fleet_ca, broker_cert, broker_key)
    (root / "cloud").mkdir()
    config = cloud_sync_config(
        root / "cloud",
        grpc={"enrollment_listen": "127.0.0.1:0"},
        tls={"cert_file": str(cloud_cert), "key_file": str(cloud_key), "client_ca_file": str(fleet_ca.cert_file)},
        fleet_ca={"cert_file": str(fleet_ca.cert_file), "key_file": str(fleet_ca.key_file)},
        mqtt=mqtt,
    )
    cloud = CloudSyncProcess(config)
    agent = FleetAgent(
        DEVICE,
        {"site": "lab"},
        root / DEVICE,
        sockets,
        "mqtt",
        {"upload": {"sample_rate": 1.0}, "telemetry": {"interval_s": 0.5}},
    )
    api: httpx.Client | None = None
    try:
        ready = cloud.wait_ready(60)
        token = admin_token(root / "cloud" / "data")
        api = httpx.Client(
            base_url=ready["http"],
            headers={"Authorization": f"Bearer {token}"},
            timeout=30,
            trust_env=False,
            verify=ssl.create_default_context(cafile=str(server_ca.cert_file)),
        )
        fleet = TlsFleet(
            pki, server_ca, fleet_ca, other_ca, broker, tls_port, cloud, ready, api, token, agent, enroll_stderr=""
        )
        # A device trusting the wrong CA first: refused, naming the CA file; the token stays unused.
        enroll_token = fleet.mint()
        argv = [*agent.enroll_argv(ready["enrollment"], enroll_token), "--ca-file"]
        wrong = run_program(AGENT, *argv, other_ca.cert_file, timeout=120)
        fleet.enroll_stderr = f"exit {wrong.returncode}: {wrong.stderr}"
        enrolled = run_program(AGENT, *argv, server_ca.cert_file, timeout=120)
        assert enrolled.returncode == 0, (enrolled.stdout, enrolled.stderr)
        agent.enrolled()
        agent.start().wait_ready(120)
    except BaseException:
        if api is not None:
            api.close()
        agent.kill()
        cloud.kill()
        broker.kill()
        remove(sockets)
        raise
    try:
        yield fleet
    finally:
        fleet.close()
        remove(sockets)
