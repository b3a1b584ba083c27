"""The broker setting cloud-sync needs, measured: Mosquitto's default queue drops QoS 1 messages to a paused
subscriber; the queue settings of deploy/mosquitto/edgefleet.conf keep them all."""

from __future__ import annotations

from pathlib import Path

import pytest
import sqlalchemy as sa

from cloud_sync.store import Database
from cloud_sync.store.telemetry import TelemetryStore
from tests.cloud_sync.telemetry.conftest import PREFIX, MakeSubscriber, telemetry
from tests.mosquitto import Mosquitto, MqttWatcher
from tests.waiting import wait_for

DEPLOY_CONF = Path(__file__).resolve().parents[3] / "deploy" / "mosquitto" / "edgefleet.conf"
TOPIC = f"{PREFIX}/devices/cam-1/telemetry"
BACKLOG = 1500  # more than Mosquitto's default max_queued_messages (1000)
T0 = 1_700_000_000_000  # 2023: device times in the past (a future one would be a wrong clock)


def latest_seq(store: TelemetryStore) -> int:
    latest = store.latest("cam-1")
    return latest.message.seq if latest is not None else 0


def deployed_queue_settings() -> str:
    lines = [line for line in DEPLOY_CONF.read_text().splitlines() if line.startswith("max_queued_")]
    assert lines, f"no max_queued_* setting in {DEPLOY_CONF}"
    return "\n".join(lines)


@pytest.mark.parametrize("deployed", [False, True], ids=["mosquitto-default", "deploy-conf"])
def test_a_paused_subscriber_loses_messages_only_under_the_default_queue_limit(
    deployed: bool, tmp_path: Path, sqlite_db: Database, make_subscriber: MakeSubscriber
) -> None:
    config = deployed_queue_settings() if deployed else ""
    store = TelemetryStore(sqlite_db)
    with Mosquitto(tmp_path / "broker", config) as broker:
        # The replica stops (a deploy, a crash, its database stalled): its session stays on the broker.
        make_subscriber(store, broker).close()
        device = MqttWatcher(broker, [], client_id="cam-1")
        try:
            sent = [
                device.client.publish(TOPIC, telemetry("cam-1", seq, timestamp_ms=T0 + seq).SerializeToString(), qos=1)
                for seq in range(1, BACKLOG + 1)
            ]
            for info in sent:
                info.wait_for_publish(10)  # the broker acknowledged each: what it loses, it loses silently
            # The replica comes back under the same client id and resumes its session.
            back = make_subscriber(store, broker)
            # Published after the backlog, behind it in the session's queue: stored last.
            device.publish(TOPIC, telemetry("cam-1", BACKLOG + 1, timestamp_ms=T0 + BACKLOG + 1).SerializeToString())
            wait_for(lambda: latest_seq(store) == BACKLOG + 1, 30, "the message sent after the backlog")
        finally:
            device.close()
        back.close(end_session=True)
    stored = store.model_window("digits", 1, ["cam-1"], since_ms=0).windows - 1
    if deployed:
        assert stored == BACKLOG
    else:
        assert stored < BACKLOG, "Mosquitto's default queue no longer drops: revisit deploy/mosquitto and docs"
        assert stored == 1000


def test_a_subscriber_stalled_on_its_database_holds_the_backlog_in_the_broker_not_in_memory(
    tmp_path: Path, pg_url: str, pg_db: Database, make_subscriber: MakeSubscriber
) -> None:
    store = TelemetryStore(pg_db)
    receive_maximum = 100
    with Mosquitto(tmp_path / "broker", deployed_queue_settings()) as broker:
        subscriber = make_subscriber(store, broker, receive_maximum=receive_maximum)
        locker = sa.create_engine(pg_url)
        device = MqttWatcher(broker, [], client_id="cam-1")
        try:
            with locker.connect() as conn, conn.begin():
                # Every insert into model_telemetry now waits: the writer stalls mid-batch, unacknowledged.
                conn.execute(sa.text("LOCK TABLE model_telemetry IN ACCESS EXCLUSIVE MODE"))
                sent = [
                    device.client.publish(
                        TOPIC, telemetry("cam-1", seq, timestamp_ms=T0 + seq).SerializeToString(), qos=1
                    )
                    for seq in range(1, BACKLOG + 1)
                ]
                for info in sent:
                    info.wait_for_publish(10)
                wait_for(lambda: subscriber.stats().received == receive_maximum, 10, "Receive Maximum deliveries")
                stats = subscriber.stats()
                # The broker holds the rest: the subscriber got no more than its Receive Maximum.
                assert stats.received == receive_maximum and stats.stored["telemetry"] == 0
            wait_for(lambda: latest_seq(store) == BACKLOG, 30, "the backlog, once the database is back")
            wait_for(lambda: store.model_window("digits", 1, None, 0).windows == BACKLOG, 10, "every window")
            # Caught a bug: Mosquitto 2.0.11 then sends past Receive Maximum, and the full hand-off queue
            # dropped QoS 1 messages, which stayed unacknowledged (so never redelivered) until a reconnect.
            assert not any(subscriber.stats().rejected.values())
        finally:
            device.close()
            locker.dispose()
        subscriber.close(end_session=True)


def test_after_a_broker_restart_messages_sent_before_cloud_sync_resubscribes_are_dropped(
    tmp_path: Path, sqlite_db: Database, make_subscriber: MakeSubscriber
) -> None:
    """A Mosquitto 2.0 limitation, kept here as a canary: it restores a persisted session's plain subscriptions
    but not its shared ones, so until cloud-sync subscribes again device messages match nobody and are dropped
    (PUBACK reason 16). Hence cloud-sync's short reconnect backoff; docs/mqtt.md says so."""
    store = TelemetryStore(sqlite_db)
    with Mosquitto(tmp_path / "broker", deployed_queue_settings(), persistence=True) as broker:
        make_subscriber(store, broker).close()  # its session, with the shared subscription, is persisted
        broker.restart()
        device = MqttWatcher(broker, [], client_id="cam-1")
        try:
            device.publish(TOPIC, telemetry("cam-1", 1, timestamp_ms=T0 + 1).SerializeToString())
            back = make_subscriber(store, broker)
            device.publish(TOPIC, telemetry("cam-1", 2, timestamp_ms=T0 + 2).SerializeToString())
            wait_for(lambda: latest_seq(store) == 2, 10, "the message sent after cloud-sync came back")
        finally:
            device.close()
        back.close(end_session=True)
    windows = store.model_window("digits", 1, ["cam-1"], since_ms=0).windows
    assert windows == 1, "Mosquitto kept the message for the shared subscriber: update docs/mqtt.md"
