"""The generated Mosquitto ACL, checked against a real broker with password_file + acl_file."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from paho.mqtt.client import Client
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from cloud_sync.errors import InvalidArgument
from cloud_sync.store import Database, DeviceRegistry
from cloud_sync.store.telemetry import TelemetryStore
from cloud_sync.telemetry.acl import acl_text, write_fleet_acl
from tests.cloud_sync.telemetry.conftest import PREFIX, MakeSubscriber, telemetry
from tests.mosquitto import Mosquitto, MqttWatcher
from tests.waiting import wait_for

MOSQUITTO_PASSWD = shutil.which("mosquitto_passwd")


def test_acl_text_grants_each_device_its_own_topics() -> None:
    text = acl_text(["cam-2", "cam-1"])
    assert "user cloud-sync\ntopic read edgefleet/v1/devices/+/telemetry\n" in text
    assert "topic write edgefleet/v1/devices/+/desired" in text
    cam1 = text[text.index("user cam-1") :].split("\n\n")[0].splitlines()
    assert cam1 == [
        "user cam-1",
        "topic write edgefleet/v1/devices/cam-1/telemetry",
        "topic write edgefleet/v1/devices/cam-1/status",
        "topic write edgefleet/v1/devices/cam-1/reported",
        "topic read edgefleet/v1/devices/cam-1/desired",
    ]
    assert text.index("user cam-1") < text.index("user cam-2")


@pytest.mark.parametrize("device_id", ["cam-1\ntopic readwrite #", "+", "cam 1", "cam/1", ""])
def test_an_id_cannot_smuggle_a_rule_into_the_file(device_id: str) -> None:
    with pytest.raises(InvalidArgument):
        acl_text([device_id])


def test_a_prefix_with_wildcards_is_refused() -> None:
    with pytest.raises(InvalidArgument):
        acl_text(["cam-1"], prefix="edgefleet/#")


def connack(broker: Mosquitto, username: str, password: str) -> str:
    """The reason code the broker answers a connection with."""
    reasons: list[str] = []
    client = Client(
        callback_api_version=CallbackAPIVersion.VERSION2,
        client_id=f"probe-{username}",
        protocol=MQTTProtocolVersion.MQTTv5,
    )
    client.username_pw_set(username, password)
    client.on_connect = lambda _c, _u, _f, reason, _p: reasons.append(str(reason))
    client.connect("127.0.0.1", broker.port)
    client.loop_start()
    try:
        return wait_for(lambda: reasons, 10, "the CONNACK")[0]
    finally:
        client.disconnect()
        client.loop_stop()


@pytest.mark.skipif(MOSQUITTO_PASSWD is None, reason="mosquitto_passwd is not installed")
def test_a_device_can_neither_publish_nor_read_under_another_device(
    tmp_path: Path, sqlite_db: Database, make_subscriber: MakeSubscriber
) -> None:
    assert MOSQUITTO_PASSWD is not None
    passwords = {"cloud-sync": "pw-cloud", "cam-1": "pw-cam-1", "cam-2": "pw-cam-2"}
    passwd = tmp_path / "edgefleet.passwd"
    for user, password in passwords.items():
        subprocess.run(
            [MOSQUITTO_PASSWD, "-b", *(["-c"] if not passwd.exists() else []), str(passwd), user, password], check=True
        )
    acl = tmp_path / "edgefleet.acl"
    assert write_fleet_acl(acl, DeviceRegistry(sqlite_db)) == 2
    store = TelemetryStore(sqlite_db)
    config = f"password_file {passwd}\nacl_file {acl}"
    with Mosquitto(tmp_path / "broker", config, anonymous=False) as broker:
        assert connack(broker, "cam-1", "wrong") != "Success"
        assert connack(broker, "ghost-9", "pw") != "Success"

        subscriber = make_subscriber(store, broker, username="cloud-sync", password=passwords["cloud-sync"])
        own, other = (f"{PREFIX}/devices/{d}/desired" for d in ("cam-1", "cam-2"))
        cam1 = MqttWatcher(
            broker,
            [own, other, f"{PREFIX}/devices/+/desired"],
            client_id="edge-cam-1",
            username="cam-1",
            password=passwords["cam-1"],
        )
        cloud = MqttWatcher(
            broker, [], client_id="cloud-admin", username="cloud-sync", password=passwords["cloud-sync"]
        )
        try:
            # cam-1 forges cam-2's telemetry and presence, then sends its own: messages of one publisher
            # arrive in order, so once its own is stored the forged ones would have arrived before it.
            cam1.publish(f"{PREFIX}/devices/cam-2/telemetry", telemetry("cam-2", 1).SerializeToString())
            cam1.publish(f"{PREFIX}/devices/cam-2/status", b"offline")
            cam1.publish(f"{PREFIX}/devices/cam-1/telemetry", telemetry("cam-1", 1).SerializeToString())
            wait_for(lambda: store.latest("cam-1") is not None, 10, "cam-1's own telemetry")
            assert store.latest("cam-2") is None
            assert [p.device_id for p in store.fleet_presence()] == ["cam-1"]
            stats = subscriber.stats()
            assert stats.received == 1 and not any(stats.rejected.values())  # the broker dropped the forgeries

            # Desired states: cam-1 subscribed to cam-2's too (by name and by wildcard) and gets only its own.
            cloud.publish(other, b"for-cam-2", retain=True)
            cloud.publish(own, b"for-cam-1", retain=True)
            wait_for(lambda: cam1.on(own), 10, "cam-1's desired state")
            assert not cam1.on(other)
            assert {m.payload for m in cam1.messages} == {b"for-cam-1"}
        finally:
            cam1.close()
            cloud.close()
        subscriber.close(end_session=True)


@pytest.mark.parametrize("device_id", ["cloud-sync", "Cloud-Sync-2", "cloud-sync-host", "edgefleet", "EdgeFleet-x"])
def test_the_names_cloud_sync_uses_can_never_be_a_device(sqlite_db: Database, device_id: str) -> None:
    registry = DeviceRegistry(sqlite_db)
    with pytest.raises(InvalidArgument, match="reserved"):
        registry.add_device(device_id)
    assert [d.device_id for d in registry.list_devices()] == ["cam-1", "cam-2"]
    with pytest.raises(InvalidArgument, match="reserved"):
        acl_text([device_id])


def test_a_device_registered_under_a_reserved_name_before_the_rule_is_left_out_of_the_acl(
    tmp_path: Path, sqlite_db: Database
) -> None:
    # A database from before the rule: the row is written as the registry once wrote it.
    from cloud_sync.store.schema import devices

    sqlite_db.write(
        lambda conn: conn.execute(
            devices.insert().values(device_id="cloud-sync", token_sha256=b"x" * 32, labels={}, created_at_ms=1)
        )
    )
    acl = tmp_path / "edgefleet.acl"

    assert write_fleet_acl(acl, DeviceRegistry(sqlite_db)) == 2
    text = acl.read_text()
    assert text.count("user cloud-sync\n") == 1 and "devices/cloud-sync/" not in text
    assert "user cam-1" in text and "user cam-2" in text


def test_cloud_syncs_broker_user_must_be_a_reserved_name() -> None:
    with pytest.raises(InvalidArgument, match="must start with cloud-sync"):
        acl_text(["cam-1"], cloud_user="aggregator")
    assert "user cloud-sync-eu\n" in acl_text(["cam-1"], cloud_user="cloud-sync-eu")


@pytest.mark.parametrize("key", ["username", "client_id"])
def test_cloud_syncs_broker_identity_in_its_config_must_be_a_reserved_name(key: str) -> None:
    from cloud_sync.config import ConfigProblem, config_from_dict

    with pytest.raises(ConfigProblem, match=f"mqtt.{key}: .*must start with cloud-sync"):
        config_from_dict({"mqtt": {key: "cam-1"}})
    assert getattr(config_from_dict({"mqtt": {key: "cloud-sync-eu-1"}}).mqtt, key) == "cloud-sync-eu-1"
