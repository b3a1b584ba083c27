"""The telemetry tables on SQLite and PostgreSQL: idempotent upserts, newest-wins, presence, model windows."""

from __future__ import annotations

import sqlalchemy as sa

from cloud_sync.store import Database, DeviceRegistry
from cloud_sync.store.telemetry import (
    DevicePresence,
    StatusReceived,
    TelemetryReceived,
    TelemetryStore,
    model_telemetry,
)
from edgefleet.proto.edgefleet.v1.telemetry_pb2 import Telemetry
from tests.cloud_sync.telemetry.conftest import telemetry, version

T0 = 1_800_000_000_000


def received(message: Telemetry, at_ms: int = T0) -> TelemetryReceived:
    return TelemetryReceived(message.device_id, message, message.SerializeToString(), at_ms)


def model_rows(db: Database) -> int:
    return int(db.read(lambda conn: conn.execute(sa.select(sa.func.count()).select_from(model_telemetry)).scalar_one()))


def test_latest_keeps_the_newest_message_whatever_order_they_arrive_in(db: Database) -> None:
    store = TelemetryStore(db)
    assert store.latest("cam-1") is None
    m5, m3 = telemetry("cam-1", 5, timestamp_ms=T0 + 5), telemetry("cam-1", 3, timestamp_ms=T0 + 3)
    store.write([received(m5, T0 + 50)])
    store.write([received(m3, T0 + 60)])  # late (a redelivery, or a slower replica): not newer
    latest = store.latest("cam-1")
    assert latest is not None and latest.message == m5 and latest.received_at_ms == T0 + 50

    # After an agent restart seq starts again; the later agent_start_ms makes it newer.
    restarted = telemetry("cam-1", 1, timestamp_ms=T0 + 9, agent_start_ms=T0)
    store.write([received(restarted, T0 + 70)])
    latest = store.latest("cam-1")
    assert latest is not None and latest.message == restarted


def test_a_batch_with_several_messages_of_one_device_keeps_the_newest(db: Database) -> None:
    store = TelemetryStore(db)
    messages = [telemetry("cam-1", seq, timestamp_ms=T0 + seq) for seq in (2, 4, 3)]
    store.write([received(m) for m in messages])
    latest = store.latest("cam-1")
    assert latest is not None and latest.message.seq == 4
    assert model_rows(db) == 3


def test_a_redelivered_message_is_stored_once(db: Database) -> None:
    store = TelemetryStore(db)
    m = telemetry("cam-1", 1, timestamp_ms=T0, models=[version("digits", 1), version("digits", 2)])
    store.write([received(m), received(m)])
    store.write([received(m)])
    assert model_rows(db) == 2
    window = store.model_window("digits", 1, None, since_ms=0)
    assert (window.windows, window.requests) == (1, 10)


def test_presence_changes_since_only_when_online_changes(db: Database) -> None:
    store = TelemetryStore(db)
    store.write([StatusReceived("cam-1", True, T0)])
    store.write([StatusReceived("cam-1", True, T0 + 10)])  # the same state again: since stays
    assert store.fleet_presence() == [DevicePresence("cam-1", True, T0, T0 + 10)]
    store.write([StatusReceived("cam-1", False, T0 + 20), StatusReceived("cam-2", True, T0 + 20)])
    assert store.fleet_presence() == [
        DevicePresence("cam-1", False, T0 + 20, T0 + 20),
        DevicePresence("cam-2", True, T0 + 20, T0 + 20),
    ]
    assert store.online_count() == (1, 1)


def test_a_retained_status_sets_presence_but_is_no_sign_of_life(db: Database) -> None:
    store = TelemetryStore(db)
    store.write([StatusReceived("cam-1", True, T0)])
    # A replica subscribes later and the broker hands it the retained `online`: the state, not a sighting.
    store.write([StatusReceived("cam-1", True, T0 + 50, retained=True)])
    assert store.fleet_presence() == [DevicePresence("cam-1", True, T0, T0)]
    store.write([StatusReceived("cam-2", False, T0 + 60, retained=True)])  # never seen before
    assert store.fleet_presence()[1] == DevicePresence("cam-2", False, T0 + 60, T0 + 60)


def test_telemetry_marks_a_device_seen_but_never_undoes_offline(db: Database) -> None:
    store = TelemetryStore(db)
    store.write([received(telemetry("cam-1", 1), T0)])  # never saw its `online`: telemetry says it is up
    assert store.fleet_presence() == [DevicePresence("cam-1", True, T0, T0)]
    store.write([StatusReceived("cam-1", False, T0 + 10)])
    store.write([received(telemetry("cam-1", 2), T0 + 20)])
    assert store.fleet_presence() == [DevicePresence("cam-1", False, T0 + 10, T0 + 20)]


def test_status_and_telemetry_in_one_batch_apply_in_order(db: Database) -> None:
    store = TelemetryStore(db)
    store.write([StatusReceived("cam-1", True, T0), received(telemetry("cam-1", 1), T0 + 5)])
    store.write([StatusReceived("cam-1", False, T0 + 9), StatusReceived("cam-1", True, T0 + 12)])
    assert store.fleet_presence() == [DevicePresence("cam-1", True, T0 + 12, T0 + 12)]


def test_model_window_combines_devices(db: Database) -> None:
    store = TelemetryStore(db)
    rows = [
        # cam-1: two windows of 10 s, p99 4 ms and 2 ms with 30 and 10 requests.
        telemetry("cam-1", 1, timestamp_ms=T0 + 10_000, models=[version(requests=30, errors=3, p99_ms=4.0)]),
        telemetry("cam-1", 2, timestamp_ms=T0 + 20_000, models=[version(requests=10, errors=0, p99_ms=2.0)]),
        # cam-2: one window, slower.
        telemetry("cam-2", 1, timestamp_ms=T0 + 20_000, models=[version(requests=20, errors=2, p99_ms=5.0)]),
        # Another version and an old window are not counted.
        telemetry("cam-2", 2, timestamp_ms=T0 + 30_000, models=[version(number=2, requests=99)]),
        telemetry("cam-1", 3, timestamp_ms=T0 - 1, models=[version(requests=1000)]),
    ]
    store.write([received(m) for m in rows])

    w = store.model_window("digits", 1, ["cam-1", "cam-2"], since_ms=T0)
    assert (w.devices, w.windows, w.requests, w.errors, w.inferences) == (2, 3, 60, 5, 120)
    assert w.error_rate == 5 / 60
    assert w.p99_ms == 5.0  # the worst device: cam-2 (cam-1's request-weighted p99 is 3.5 ms)
    assert w.p99_weighted_ms == (30 * 4 + 10 * 2 + 20 * 5) / 60
    assert w.p99_max_ms == 5.0
    assert w.requests_per_s == 40 / 20 + 20 / 10
    assert w.mean_batch_size == 2.0
    assert w.cpu_seconds == 0.03

    only = store.model_window("digits", 1, ["cam-1"], since_ms=T0)
    assert (only.devices, only.requests, only.p99_ms) == (1, 40, 3.5)
    assert store.model_window("digits", 1, [], since_ms=T0).devices == 0
    assert store.model_window("absent", 1, None, since_ms=0).requests == 0


def test_model_window_queries_long_device_lists_in_chunks(db: Database) -> None:
    store = TelemetryStore(db)
    store.write([received(telemetry("cam-2", 1, timestamp_ms=T0))])
    ids = [f"dev-{i}" for i in range(2500)] + ["cam-2"]
    assert store.model_window("digits", 1, ids, since_ms=0).requests == 10


def test_model_windows_groups_every_version(db: Database) -> None:
    store = TelemetryStore(db)
    store.write([received(telemetry("cam-1", 1, timestamp_ms=T0, models=[version("digits", 1), version("digits", 2)]))])
    windows = store.model_windows(since_ms=0)
    assert [(w.model, w.version, w.requests) for w in windows] == [("digits", 1, 10), ("digits", 2, 10)]


def test_registered_devices_leave_out_revoked_ones(db: Database) -> None:
    DeviceRegistry(db).revoke("cam-2")
    assert TelemetryStore(db).registered_devices() == frozenset({"cam-1"})


def test_a_window_stamped_ahead_of_the_clouds_clock_is_placed_when_it_was_received(db: Database) -> None:
    from cloud_sync.telemetry.validation import MAX_FUTURE_SKEW_MS

    store = TelemetryStore(db)
    broken = telemetry("cam-1", 1, timestamp_ms=2**62, models=[version("digits", 1)])
    slightly_fast = telemetry("cam-2", 1, timestamp_ms=T0 + MAX_FUTURE_SKEW_MS, models=[version("digits", 1)])
    store.write([received(broken, T0), received(slightly_fast, T0)])

    # The broken clock's window ends when it arrived: in "the last minute" now, and in no query of the future.
    assert store.model_window("digits", 1, ["cam-1"], since_ms=T0 - 60_000).windows == 1
    assert store.model_window("digits", 1, ["cam-1"], since_ms=T0).windows == 0
    # Within the tolerance the device's own time stands.
    assert store.model_window("digits", 1, ["cam-2"], since_ms=T0 + MAX_FUTURE_SKEW_MS - 1).windows == 1


def test_a_message_from_a_broken_clock_does_not_stay_the_latest(db: Database) -> None:
    store = TelemetryStore(db)
    broken = telemetry("cam-1", 9, timestamp_ms=2**62, agent_start_ms=2**62)
    store.write([received(broken, T0)])
    # The agent restarts with its clock fixed: its run's start is "earlier", its message arrives later.
    fixed = telemetry("cam-1", 1, timestamp_ms=T0 + 10_000, agent_start_ms=T0 + 5_000)
    store.write([received(fixed, T0 + 10_000)])
    latest = store.latest("cam-1")
    assert latest is not None and latest.message == fixed
    # Within one run, seq still decides: a late copy of an older message does not replace it.
    store.write([received(telemetry("cam-1", 0, timestamp_ms=T0, agent_start_ms=T0 + 5_000), T0 + 20_000)])
    latest = store.latest("cam-1")
    assert latest is not None and latest.message == fixed
