"""The subscriber's own rules: config errors, retrying while the database is unavailable, draining on close."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from cloud_sync.errors import InvalidArgument
from cloud_sync.store import Database, DeviceRegistry, open_database
from cloud_sync.store.telemetry import TelemetryStore
from cloud_sync.telemetry.subscriber import TelemetrySubscriber
from tests.cloud_sync.telemetry.conftest import PREFIX, MakeSubscriber, telemetry
from tests.mosquitto import Mosquitto, MqttWatcher
from tests.waiting import wait_for

TOPIC = f"{PREFIX}/devices/cam-1/telemetry"


@pytest.mark.parametrize("url", ["http://broker:1883", "mqtt://", "broker:1883"])
def test_a_bad_broker_url_is_an_invalid_argument_naming_mqtt_url(url: str, tmp_path: Path) -> None:
    db = open_database(f"sqlite:///{tmp_path / 'cloud.db'}")
    try:
        with pytest.raises(InvalidArgument, match="mqtt.url"):
            TelemetrySubscriber(TelemetryStore(db), url)
    finally:
        db.close()


def test_while_the_database_is_locked_the_writer_retries_and_acknowledges_nothing(
    tmp_path: Path, broker: Mosquitto, make_subscriber: MakeSubscriber
) -> None:
    path = tmp_path / "locked.db"
    db = open_database(f"sqlite:///{path}", busy_timeout_ms=50)  # a lock held elsewhere fails fast
    try:
        DeviceRegistry(db).add_device("cam-1")
        store = TelemetryStore(db)
        subscriber = make_subscriber(store, broker)
        device = MqttWatcher(broker, [], client_id="cam-1")
        other = sqlite3.connect(path, isolation_level=None)
        try:
            other.execute("BEGIN IMMEDIATE")  # another process holds SQLite's write lock
            device.publish(TOPIC, telemetry("cam-1", 1).SerializeToString())
            wait_for(lambda: subscriber.stats().store_retries >= 2, 10, "the writer to retry")
            assert subscriber.stats().stored["telemetry"] == 0
            other.execute("ROLLBACK")
            wait_for(lambda: store.latest("cam-1") is not None, 10, "the message once the lock is gone")
        finally:
            other.close()
            device.close()
        subscriber.close(end_session=True)
    finally:
        db.close()


def test_close_stores_and_acknowledges_what_is_queued(sqlite_db: Database, broker: Mosquitto) -> None:
    store = TelemetryStore(sqlite_db)
    subscriber = TelemetrySubscriber(store, broker.url, client_id="cloud-sync-drain", reconnect_delay=(1, 1))
    subscriber.start()
    wait_for(lambda: subscriber.ready, 10, "the subscriber")
    device = MqttWatcher(broker, [], client_id="cam-1")
    try:
        sent = [
            device.client.publish(
                TOPIC, telemetry("cam-1", seq, timestamp_ms=1_700_000_000_000 + seq).SerializeToString(), qos=1
            )
            for seq in range(1, 301)
        ]
        for info in sent:
            info.wait_for_publish(10)
        wait_for(lambda: subscriber.stats().received == 300, 10, "every message received")
    finally:
        device.close()
    subscriber.close(timeout=10)  # keeps its session: anything unacknowledged would come back
    assert store.model_window("digits", 1, ["cam-1"], since_ms=0).windows == 300
    again = TelemetrySubscriber(store, broker.url, client_id="cloud-sync-drain", reconnect_delay=(1, 1))
    again.start()
    try:
        wait_for(lambda: again.ready, 10, "the subscriber, back")
        watcher = MqttWatcher(broker, [], client_id="cam-1-sentinel")
        try:
            watcher.publish(TOPIC, telemetry("cam-1", 301, timestamp_ms=1_800_000_000_301).SerializeToString())
        finally:
            watcher.close()
        wait_for(lambda: again.stats().stored["telemetry"] >= 1, 10, "the message after the restart")
        assert again.stats().received == 1  # nothing was redelivered: everything had been acknowledged
    finally:
        again.close(end_session=True)


def test_telemetry_from_a_broken_clock_is_stored_when_it_arrived_and_counted(
    sqlite_db: Database, broker: Mosquitto, make_subscriber: MakeSubscriber
) -> None:
    import time

    store = TelemetryStore(sqlite_db)
    subscriber = make_subscriber(store, broker)
    device = MqttWatcher(broker, [], client_id="cam-1")
    before = time.time_ns() // 1_000_000
    try:
        device.publish(TOPIC, telemetry("cam-1", 1, timestamp_ms=2**62).SerializeToString())
        wait_for(lambda: store.latest("cam-1") is not None, 10, "the message")
    finally:
        device.close()
    after = time.time_ns() // 1_000_000
    assert subscriber.stats().clock_skewed == 1
    # Placed on the cloud's clock: within the last minute now, where a rollout gate's query looks.
    assert store.model_window("digits", 1, ["cam-1"], since_ms=before - 1).windows == 1
    assert store.model_window("digits", 1, ["cam-1"], since_ms=after).windows == 0
