"""Garbage on device topics is ignored and counted by reason; nothing wrong is stored; the subscriber goes on."""

from __future__ import annotations

import math
import random

import pytest
import sqlalchemy as sa
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, generate_latest

from cloud_sync.store import Database
from cloud_sync.store.telemetry import TelemetryStore, device_presence, model_telemetry, telemetry_latest
from cloud_sync.telemetry import TelemetryMetrics
from cloud_sync.telemetry.validation import REASONS, Rejected, check_status, check_telemetry, parse_topic
from edgefleet.proto.edgefleet.v1.telemetry_pb2 import LatencySummary, Telemetry
from tests.cloud_sync.telemetry.conftest import PREFIX, MakeSubscriber, telemetry, version
from tests.mosquitto import Mosquitto, MqttWatcher
from tests.waiting import wait_for


def topic(device_id: str, kind: str = "telemetry") -> str:
    return f"{PREFIX}/devices/{device_id}/{kind}"


def reason_of(device_id: str, payload: bytes, **options: object) -> str:
    with pytest.raises(Rejected) as caught:
        check_telemetry(device_id, payload, **options)  # type: ignore[arg-type]
    return caught.value.reason


def with_latency(p50: float, p95: float, p99: float) -> bytes:
    message = telemetry("cam-1", models=[version()])
    message.models[0].latency.CopyFrom(LatencySummary(p50_ms=p50, p95_ms=p95, p99_ms=p99))
    return message.SerializeToString()


def test_topics_name_a_valid_device_and_a_known_kind() -> None:
    assert parse_topic(topic("cam-1"), PREFIX) == ("cam-1", "telemetry")
    assert parse_topic(topic("cam-1", "status"), PREFIX) == ("cam-1", "status")
    for bad, reason in [
        (topic("cam-1", "reported"), "invalid_topic"),
        ("other/v1/devices/cam-1/telemetry", "invalid_topic"),
        (topic("bad id!"), "invalid_device_id"),
        (topic("x" * 200), "invalid_device_id"),
    ]:
        with pytest.raises(Rejected) as caught:
            parse_topic(bad, PREFIX)
        assert caught.value.reason == reason


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"\xff\xff\xff", "undecodable"),
        (telemetry("cam-2").SerializeToString(), "device_mismatch"),
        (b"\x0a\x05cam-1" + b"\x00" * 70_000, "oversized"),
        (with_latency(math.nan, 2.0, 3.0), "invalid_values"),
        (with_latency(1.0, 2.0, math.inf), "invalid_values"),
        (with_latency(3.0, 2.0, 1.0), "invalid_values"),
        (telemetry("cam-1", models=[version(requests=1, errors=2)]).SerializeToString(), "invalid_values"),
        (telemetry("cam-1", models=[version(), version()]).SerializeToString(), "invalid_values"),
        (telemetry("cam-1", models=[version(cpu_seconds=-1.0)]).SerializeToString(), "invalid_values"),
        (telemetry("cam-1", models=[version(number=0)]).SerializeToString(), "invalid_values"),
        (telemetry("cam-1", window_s=math.nan).SerializeToString(), "invalid_values"),
        (telemetry("cam-1", timestamp_ms=-5).SerializeToString(), "invalid_values"),
        (Telemetry(device_id="cam-1", timestamp_ms=1, seq=2**63).SerializeToString(), "invalid_values"),
    ],
    # Numbered, not named after the payload: some carry the current time, and every collecting process
    # (pytest-xdist's workers) must see the same ids.
    ids=lambda value: value if isinstance(value, str) else "payload",
)
def test_bad_telemetry_is_rejected_with_its_reason(payload: bytes, reason: str) -> None:
    assert reason_of("cam-1", payload) == reason


@given(st.binary(max_size=512))
def test_arbitrary_bytes_are_rejected_or_accepted_never_crash(payload: bytes) -> None:
    try:
        message = check_telemetry("cam-1", payload)
    except Rejected as exc:
        assert exc.reason in REASONS
    else:
        assert message.device_id == "cam-1"


def test_a_content_type_other_than_telemetry_is_rejected() -> None:
    payload = telemetry("cam-1").SerializeToString()
    assert reason_of("cam-1", payload, content_type="application/json") == "content_type"
    assert check_telemetry("cam-1", payload, content_type="edgefleet.v1.Telemetry").device_id == "cam-1"
    assert check_telemetry("cam-1", payload, content_type=None).device_id == "cam-1"  # MQTT 3 clients set none


def test_status_is_online_or_offline() -> None:
    assert check_status(b"online") is True and check_status(b"offline") is False
    with pytest.raises(Rejected, match="invalid_status"):
        check_status(b"maybe")


def count(db: Database, table: sa.Table) -> int:
    return int(db.read(lambda conn: conn.execute(sa.select(sa.func.count()).select_from(table)).scalar_one()))


def test_garbage_through_the_broker_is_counted_and_the_subscriber_keeps_working(
    sqlite_db: Database, broker: Mosquitto, make_subscriber: MakeSubscriber
) -> None:
    store = TelemetryStore(sqlite_db)
    subscriber = make_subscriber(store, broker)
    attacker = MqttWatcher(broker, [], client_id="attacker")  # the broker's ACL is off in this test
    try:
        noise = random.Random(7).randbytes(64)
        garbage = [
            (topic("cam-1"), b"\xff\xff\xff", "undecodable"),
            (topic("cam-1"), noise, reason_of("cam-1", noise)),
            (topic("cam-1"), telemetry("cam-2").SerializeToString(), "device_mismatch"),
            (topic("ghost-9"), telemetry("ghost-9").SerializeToString(), "unregistered"),
            (topic("ghost-9", "status"), b"online", "unregistered"),
            (topic("bad id!"), telemetry("bad id!").SerializeToString(), "invalid_device_id"),
            (topic("cam-1"), b"\x0a\x05cam-1" + b"\x00" * 70_000, "oversized"),
            (topic("cam-1"), with_latency(math.nan, math.nan, math.nan), "invalid_values"),
            (topic("cam-1", "status"), b"maybe", "invalid_status"),
        ]
        for where, payload, _ in garbage:
            attacker.publish(where, payload)
        attacker.publish(topic("cam-1"), b"{}", content_type="application/json")
        # Messages of one publisher arrive in order: once this one is stored, all the garbage was handled.
        attacker.publish(topic("cam-1"), telemetry("cam-1", 7).SerializeToString())
        wait_for(lambda: store.latest("cam-1") is not None, 10, "the valid message after the garbage")
    finally:
        attacker.close()

    expected = {reason: 0 for reason in REASONS}
    for _, _, reason in garbage:
        expected[reason] += 1
    expected["content_type"] += 1
    # The counters move just after the commit that store.latest() saw.
    wait_for(lambda: subscriber.stats().stored == {"telemetry": 1, "status": 0}, 10, "the valid message counted")
    wait_for(lambda: subscriber.stats().rejected == expected, 10, f"rejections counted as {expected}")
    latest = store.latest("cam-1")
    assert latest is not None and latest.message.seq == 7
    assert count(sqlite_db, telemetry_latest) == 1 and count(sqlite_db, model_telemetry) == 1
    assert [p.device_id for p in store.fleet_presence()] == ["cam-1"]  # no row for ghost-9
    assert count(sqlite_db, device_presence) == 1

    registry = CollectorRegistry()
    registry.register(TelemetryMetrics(store, subscriber))
    text = generate_latest(registry).decode()
    assert 'cloud_sync_telemetry_rejected_total{reason="unregistered"} 2.0' in text
    assert f'cloud_sync_telemetry_rejected_total{{reason="undecodable"}} {expected["undecodable"]}.0' in text
    assert 'cloud_sync_telemetry_messages_total{kind="telemetry"} 1.0' in text
