"""Device accounts on a real Mosquitto with its dynamic security plugin, kept by a real `cloud-sync run`.

An enrolled device logs in to the broker with its id and token and reaches only its own topics; revoking it
disconnects it and it cannot log in again. cloud-sync's own user administers the plugin.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import httpx
import pytest
from paho.mqtt.client import Client
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from cloud_sync.admin_token import admin_token
from cloud_sync.broker_accounts import device_acls, device_role
from edgefleet.proto.edgefleet.v1 import services_pb2, services_pb2_grpc, state_pb2
from tests.cloud_sync.conftest import cloud_sync_config
from tests.mosquitto import Mosquitto
from tests.processes import CloudSyncProcess
from tests.waiting import wait_for

PLUGIN = "/usr/lib/x86_64-linux-gnu/mosquitto_dynamic_security.so"
ADMIN = "cloud-sync-admin"
ADMIN_PASSWORD = "admin-password-for-tests"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not Path(PLUGIN).exists(), reason="Mosquitto's dynamic security plugin is not installed"),
]


@dataclass
class Fleet:
    broker: Mosquitto
    api: httpx.Client
    channel: grpc.Channel

    def enroll(self, hostname: str) -> services_pb2.EnrollResponse:
        token = self.api.post("/v1/enrollment-tokens", json={}).json()["token"]
        stub = services_pb2_grpc.EnrollmentStub(self.channel)
        request = services_pb2.EnrollRequest(token=token, agent=state_pb2.AgentInfo(hostname=hostname))
        response: services_pb2.EnrollResponse = stub.Enroll(request, timeout=20)
        return response


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Fleet]:
    broker_dir = tmp_path / "broker"
    broker_dir.mkdir()
    dynsec = broker_dir / "dynamic-security.json"
    subprocess.run(
        ["mosquitto_ctrl", "dynsec", "init", str(dynsec), ADMIN, ADMIN_PASSWORD], check=True, capture_output=True
    )
    config = f"plugin {PLUGIN}\nplugin_opt_config_file {dynsec}"
    password_file = tmp_path / "broker-password"
    password_file.write_text(ADMIN_PASSWORD + "\n")
    with Mosquitto(broker_dir, config, anonymous=False) as broker:
        mqtt = {
            "url": broker.url,
            "username": ADMIN,
            "password_file": str(password_file),
            "manage_accounts": "mosquitto-dynsec",
        }
        (tmp_path / "cloud").mkdir()
        proc = CloudSyncProcess(cloud_sync_config(tmp_path / "cloud", mqtt=mqtt))
        try:
            ready = proc.wait_ready(60)
            token = admin_token(tmp_path / "cloud" / "data")
            with (
                httpx.Client(
                    base_url=ready["http"], headers={"Authorization": f"Bearer {token}"}, timeout=30, trust_env=False
                ) as api,
                grpc.insecure_channel(ready["grpc"]) as channel,
            ):
                yield Fleet(broker, api, channel)
        finally:
            proc.kill()


@dataclass
class DeviceClient:
    """A device's MQTT session: what connecting, subscribing and disconnecting answered."""

    connects: list[str] = field(default_factory=list)
    disconnects: list[str] = field(default_factory=list)
    granted: list[list[int]] = field(default_factory=list)
    client: Client | None = None


def connect(broker: Mosquitto, username: str, password: str) -> DeviceClient:
    seen = DeviceClient()
    client = Client(
        callback_api_version=CallbackAPIVersion.VERSION2, client_id=username, protocol=MQTTProtocolVersion.MQTTv5
    )
    client.username_pw_set(username, password)
    client.on_connect = lambda _c, _u, _f, reason, _p: seen.connects.append(str(reason))
    client.on_disconnect = lambda _c, _u, _f, reason, _p: seen.disconnects.append(str(reason))
    client.on_subscribe = lambda _c, _u, _m, codes, _p: seen.granted.append([c.value for c in codes])
    client.reconnect_delay_set(60, 60)  # one attempt per test step: the test reconnects itself
    client.connect_async("127.0.0.1", broker.port, keepalive=10)
    client.loop_start()
    seen.client = client
    wait_for(lambda: seen.connects or seen.disconnects, 10, f"{username} to get an answer from the broker")
    return seen


def close(seen: DeviceClient) -> None:
    assert seen.client is not None
    seen.client.disconnect()
    seen.client.loop_stop()


def test_an_enrolled_device_reaches_its_own_topics_only_and_revocation_cuts_it_off(fleet: Fleet) -> None:
    device = fleet.enroll("jetson-mqtt")
    other = fleet.enroll("jetson-other")
    seen = connect(fleet.broker, device.device_id, device.device_token)
    assert seen.connects == ["Success"], seen
    assert seen.client is not None
    own = f"edgefleet/v1/devices/{device.device_id}/desired"
    theirs = f"edgefleet/v1/devices/{other.device_id}/desired"
    seen.client.subscribe([(own, 1), (theirs, 1)])
    wait_for(lambda: seen.granted, 10, "the subscription's answer")
    assert seen.granted[0][0] == 1 and seen.granted[0][1] >= 0x80, seen.granted  # own granted, theirs refused

    assert fleet.api.post(f"/v1/devices/{device.device_id}/revoke").status_code == 200
    wait_for(lambda: seen.disconnects, 10, "the broker to disconnect the revoked device")
    close(seen)
    again = connect(fleet.broker, device.device_id, device.device_token)
    assert again.connects != ["Success"] and (again.connects or again.disconnects), again
    close(again)
    # The other device is untouched.
    still = connect(fleet.broker, other.device_id, other.device_token)
    assert still.connects == ["Success"]
    close(still)


def test_a_wrong_password_is_refused(fleet: Fleet) -> None:
    device = fleet.enroll("jetson-wrong")
    seen = connect(fleet.broker, device.device_id, "efd_not-the-token")
    assert seen.connects != ["Success"]
    close(seen)


def test_device_role_grants_only_its_own_topics() -> None:
    acls = device_acls("cam-1", "edgefleet/v1")
    assert all("/devices/cam-1/" in acl["topic"] and acl["allow"] for acl in acls)
    assert {acl["topic"].rsplit("/", 1)[1] for acl in acls} == {"telemetry", "status", "reported", "desired"}
    assert device_role("cam-1") == "edgefleet-device-cam-1"
