"""Result ingest on both engines: idempotence, the watermark rules, validation, concurrency, the queries."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from cloud_sync.errors import InvalidArgument, InvalidBatch, NotFound
from cloud_sync.store import DeviceRegistry, IngestLimits, IngestOutcome, Reconciliation, ResultStore, open_database
from cloud_sync.store.database import Database
from edgefleet.proto.edgefleet.v1 import results_pb2
from tests.cloud_sync.store.conftest import make_batch, make_record


def _state(store: ResultStore, device_id: str) -> tuple[Reconciliation, list[int], list[tuple[int, int]]]:
    reconciliation = store.reconcile(device_id)
    # last_upload_at_ms moves on every accepted upload, replays included; compare the rest.
    return (
        Reconciliation(**{**reconciliation.__dict__, "last_upload_at_ms": None}),
        store.seqs(device_id),
        store.eviction_ranges(device_id),
    )


# --- idempotence ---------------------------------------------------------------------------------------------


def test_a_batch_is_stored_and_acked(store: ResultStore, device: str) -> None:
    outcome = store.ingest(device, make_batch(0, 5, produced_total=7, evicted_total=0))

    assert outcome == IngestOutcome(acked_seq=5, stored=5, duplicates=0, evicted=0)
    assert store.seqs(device) == [1, 2, 3, 4, 5]
    reconciliation = store.reconcile(device)
    assert (reconciliation.stored, reconciliation.evicted, reconciliation.acked_seq) == (5, 0, 5)
    assert (reconciliation.device_produced, reconciliation.device_evicted) == (7, 0)
    assert reconciliation.last_upload_at_ms is not None


def test_the_same_batch_twice_stores_nothing_twice(store: ResultStore, device: str) -> None:
    batch = make_batch(0, 5)
    store.ingest(device, batch)
    before = _state(store, device)

    again = store.ingest(device, batch)

    assert again == IngestOutcome(acked_seq=5, stored=0, duplicates=5, evicted=0)
    after = _state(store, device)
    assert after[1:] == before[1:]
    assert after[0] == Reconciliation(**{**before[0].__dict__, "duplicates_total": 5})


def test_a_retry_of_the_latest_batch_after_a_lost_ack(store: ResultStore, device: str) -> None:
    store.ingest(device, make_batch(0, 5))
    store.ingest(device, make_batch(5, 10))

    # The device never got the second ack: it resends from its own ack, 5, with one more record.
    outcome = store.ingest(device, make_batch(5, 11))

    assert outcome == IngestOutcome(acked_seq=11, stored=1, duplicates=5, evicted=0)
    assert store.seqs(device) == list(range(1, 12))


def test_a_replay_of_an_old_batch_changes_nothing_but_the_duplicate_count(store: ResultStore, device: str) -> None:
    store.ingest(device, make_batch(0, 5, produced_total=5))
    store.ingest(device, make_batch(5, 10, [6, 8, 10], produced_total=10, evicted_total=2))
    before = _state(store, device)

    outcome = store.ingest(device, make_batch(0, 5, produced_total=5))

    assert outcome == IngestOutcome(acked_seq=10, stored=0, duplicates=5, evicted=0)
    after = _state(store, device)
    assert after[1:] == before[1:]
    assert after[0].device_produced == 10 and after[0].device_evicted == 2  # not set back by the replay
    assert after[0].duplicates_total == before[0].duplicates_total + 5


def test_an_empty_batch_at_the_watermark_returns_the_ack(store: ResultStore, device: str) -> None:
    store.ingest(device, make_batch(0, 4))
    assert store.ingest(device, make_batch(4, 4)) == IngestOutcome(acked_seq=4, stored=0, duplicates=0, evicted=0)


# --- watermark rules ---------------------------------------------------------------------------------------------


def test_contiguous_batches_move_the_watermark(store: ResultStore, device: str) -> None:
    for after in range(0, 30, 10):
        assert store.ingest(device, make_batch(after, after + 10)).acked_seq == after + 10
    assert store.seqs(device) == list(range(1, 31))


def test_declared_evictions_are_counted_and_kept_as_ranges(store: ResultStore, device: str) -> None:
    outcome = store.ingest(device, make_batch(0, 10, [1, 2, 5, 9], produced_total=10, evicted_total=6))

    assert outcome == IngestOutcome(acked_seq=10, stored=4, duplicates=0, evicted=6)
    assert store.eviction_ranges(device) == [(3, 4), (6, 8), (10, 10)]
    reconciliation = store.reconcile(device)
    assert reconciliation.stored + reconciliation.evicted == reconciliation.acked_seq == 10
    assert (reconciliation.device_produced, reconciliation.device_evicted) == (10, 6)


def test_a_batch_of_only_evictions_moves_the_watermark(store: ResultStore, device: str) -> None:
    assert store.ingest(device, make_batch(0, 1000, [])) == IngestOutcome(1000, 0, 0, 1000)
    assert store.eviction_ranges(device) == [(1, 1000)]


def test_a_batch_past_a_gap_is_stored_but_not_acked(store: ResultStore, device: str) -> None:
    store.ingest(device, make_batch(0, 10))

    outcome = store.ingest(device, make_batch(20, 30, [21, 25]))  # the cloud lacks 11..20

    assert outcome == IngestOutcome(acked_seq=10, stored=2, duplicates=0, evicted=0)
    assert store.eviction_ranges(device) == []
    reconciliation = store.reconcile(device)
    assert (reconciliation.acked_seq, reconciliation.max_stored_seq, reconciliation.evicted) == (10, 25, 0)


def test_the_gap_filled_then_the_batch_resent(store: ResultStore, device: str) -> None:
    store.ingest(device, make_batch(0, 10))
    store.ingest(device, make_batch(20, 30, [21, 25]))

    filled = store.ingest(device, make_batch(10, 20, [11, 12]))
    assert filled == IngestOutcome(acked_seq=20, stored=2, duplicates=0, evicted=8)

    # The device never saw an ack past 20 for (20, 30]: it sends it again; evictions count only now.
    resent = store.ingest(device, make_batch(20, 30, [21, 25]))
    assert resent == IngestOutcome(acked_seq=30, stored=0, duplicates=2, evicted=8)
    assert store.eviction_ranges(device) == [(13, 20), (22, 24), (26, 30)]
    reconciliation = store.reconcile(device)
    assert reconciliation.stored + reconciliation.evicted == reconciliation.acked_seq == 30


def test_records_stored_past_a_gap_are_not_counted_evicted_by_a_later_batch(store: ResultStore, device: str) -> None:
    """A batch that covers seqs an earlier gap batch stored, without those records, must not count them evicted."""
    store.ingest(device, make_batch(10, 20))  # gap: 1..10 missing
    outcome = store.ingest(device, make_batch(0, 25, [1, 2]))

    assert outcome.acked_seq == 25
    assert outcome.evicted == 25 - 2 - 10  # 3..10 and 21..25
    assert store.eviction_ranges(device) == [(3, 10), (21, 25)]
    reconciliation = store.reconcile(device)
    assert reconciliation.stored + reconciliation.evicted == 25


def test_an_overlapping_batch_stores_only_the_new_records(store: ResultStore, device: str) -> None:
    store.ingest(device, make_batch(0, 10, [1, 2, 3]))  # 4..10 declared evicted

    # Overlaps the watermark, and still holds seq 5, which it declared evicted before: not stored now.
    outcome = store.ingest(device, make_batch(2, 15, [3, 5, 12]))

    assert outcome == IngestOutcome(acked_seq=15, stored=1, duplicates=2, evicted=4)
    assert store.seqs(device) == [1, 2, 3, 12]
    reconciliation = store.reconcile(device)
    assert reconciliation.stored + reconciliation.evicted == 15


def test_devices_have_their_own_watermarks(store: ResultStore, registry: DeviceRegistry) -> None:
    registry.add_device("cam-a")
    registry.add_device("cam-b")
    store.ingest("cam-a", make_batch(0, 10))
    assert store.ingest("cam-b", make_batch(0, 3)) == IngestOutcome(3, 3, 0, 0)
    assert store.seqs("cam-a") == list(range(1, 11))
    assert store.seqs("cam-b") == [1, 2, 3]


# --- refusals ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("batch", "reason"),
    [
        (make_batch(5, 3, []), "through_seq 3 is below after_seq 5"),
        (make_batch(0, 3, [2, 1]), "seqs must increase"),
        (make_batch(0, 3, [1, 9]), "past through_seq"),
        (make_batch(0, 1, records=[make_record(1, kind=42)]), "not a known RecordKind"),
        (make_batch(0, 1, records=[make_record(1, model="\0")]), "NUL"),
        (make_batch(0, 11), "11 records in one batch: the limit is 10"),
    ],
)
def test_an_invalid_batch_changes_nothing(
    db: Database, device: str, batch: results_pb2.ResultBatch, reason: str
) -> None:
    store = ResultStore(db, IngestLimits(max_records=10))
    store.ingest(device, make_batch(0, 2))
    before = _state(store, device)
    before_upload = store.reconcile(device).last_upload_at_ms

    with pytest.raises(InvalidBatch, match=reason):
        store.ingest(device, batch)

    assert _state(store, device) == before
    assert store.reconcile(device).last_upload_at_ms == before_upload


def test_an_unknown_device_cannot_upload(store: ResultStore) -> None:
    with pytest.raises(NotFound, match="no device 'ghost'"):
        store.ingest("ghost", make_batch(0, 1))
    with pytest.raises(NotFound):
        store.reconcile("ghost")
    assert store.seqs("ghost") == []


def test_the_largest_values_the_wire_allows_are_stored(store: ResultStore, device: str) -> None:
    """uint32 version and priority do not fit PostgreSQL's INTEGER; a seq near 2**63 fits BIGINT."""
    record = make_record(2**62, created_at_ms=1, version=2**32 - 1, priority=2**32 - 1, payload=b"\0\xff" * 1000)
    store.ingest(device, make_batch(2**62 - 1, 2**62, records=[record]))
    [stored] = store.results(device)
    assert (stored.seq, stored.version, stored.priority, stored.payload) == (
        2**62,
        2**32 - 1,
        2**32 - 1,
        record.payload,
    )


# --- concurrency -------------------------------------------------------------------------------------------------


def test_concurrent_interleaved_batches_of_one_device(store: ResultStore, device: str) -> None:
    """Threads upload a device's batches out of order, each resending its own until acked (as a device would)."""
    size, count, threads = 50, 40, 8
    batches = [
        make_batch(k * size, (k + 1) * size, [s for s in range(k * size + 1, (k + 1) * size + 1) if s % 7])
        for k in range(count)
    ]
    calls = []
    lock = threading.Lock()
    start = threading.Barrier(threads)

    def upload(worker: int) -> None:
        start.wait(10)
        deadline = time.monotonic() + 60
        for batch in batches[worker::threads]:
            while True:
                outcome = store.ingest(device, batch)
                with lock:
                    calls.append((len(batch.records), outcome))
                if outcome.acked_seq >= batch.through_seq:
                    break
                # A watermark that lost an update (no row lock) never gets here: fail instead of spinning.
                assert time.monotonic() < deadline, f"batch through {batch.through_seq} unacked: {outcome}"

    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(upload, range(threads)))

    expected = [s for s in range(1, size * count + 1) if s % 7]
    assert store.seqs(device) == expected
    reconciliation = store.reconcile(device)
    assert reconciliation.acked_seq == size * count
    assert reconciliation.stored == len(expected)
    assert reconciliation.stored + reconciliation.evicted == size * count
    assert sum(outcome.stored for _, outcome in calls) == len(expected)
    assert sum(outcome.evicted for _, outcome in calls) == reconciliation.evicted
    assert reconciliation.duplicates_total == sum(n for n, _ in calls) - len(expected)
    assert all(o.stored + o.duplicates == n for n, o in calls)


def test_concurrent_devices_and_a_refused_batch_among_them(store: ResultStore, registry: DeviceRegistry) -> None:
    """On SQLite these share transactions; the refused batch must fail alone."""
    for i in range(6):
        registry.add_device(f"cam-{i}")

    def upload(i: int) -> IngestOutcome:
        device_id = f"cam-{i}" if i < 6 else "ghost"
        return store.ingest(device_id, make_batch(0, 100))

    with ThreadPoolExecutor(7) as pool:
        futures = [pool.submit(upload, i) for i in range(7)]
    assert [f.result() for f in futures[:6]] == [IngestOutcome(100, 100, 0, 0)] * 6
    with pytest.raises(NotFound):
        futures[6].result()


# --- queries -----------------------------------------------------------------------------------------------------


def test_results_pages_through_a_stable_cursor(store: ResultStore, registry: DeviceRegistry) -> None:
    registry.add_device("cam-a")
    registry.add_device("cam-b")
    store.ingest("cam-a", make_batch(0, 5))
    store.ingest("cam-b", make_batch(0, 3))
    store.ingest("cam-a", make_batch(5, 7))

    seen, cursor = [], 0
    while page := store.results(after_id=cursor, limit=3):
        seen.extend(page)
        cursor = page[-1].id
    assert [(r.device_id, r.seq) for r in seen] == [("cam-a", s) for s in range(1, 6)] + [
        ("cam-b", s) for s in range(1, 4)
    ] + [("cam-a", 6), ("cam-a", 7)]
    assert [r.id for r in seen] == sorted({r.id for r in seen})

    only_a = store.results("cam-a", after_id=seen[2].id, limit=100)
    assert [r.seq for r in only_a] == [4, 5, 6, 7]
    assert store.results("cam-a", after_id=seen[-1].id) == []

    first = seen[0]
    assert (first.model, first.version, first.kind, first.payload, first.request_id) == (
        "digits",
        2,
        results_pb2.RECORD_KIND_RESULT,
        b"payload-1",
        "req-1",
    )
    assert first.received_at_ms >= 0 and first.created_at_ms == 1_700_000_000_001


@pytest.mark.parametrize(
    ("after_id", "limit", "reason"), [(0, 0, "limit must be"), (0, 10_001, "limit"), (-1, 5, "after_id")]
)
def test_results_refuses_bad_paging(store: ResultStore, after_id: int, limit: int, reason: str) -> None:
    with pytest.raises(InvalidArgument, match=reason):
        store.results(after_id=after_id, limit=limit)


def test_two_processes_on_one_sqlite_file_keep_the_watermark_consistent(tmp_path: Path) -> None:
    """Two Database objects (as two cloud-sync processes would) serialise on SQLite's write lock."""
    url = f"sqlite:///{tmp_path / 'cloud.db'}"
    first, second = open_database(url), open_database(url)
    try:
        DeviceRegistry(first).add_device("cam-1")
        stores = [ResultStore(first), ResultStore(second)]
        batches = [make_batch(k * 20, (k + 1) * 20) for k in range(30)]

        def upload(worker: int) -> None:
            for batch in batches[worker::4]:
                stores[worker % 2].ingest("cam-1", batch)

        with ThreadPoolExecutor(4) as pool:
            list(pool.map(upload, range(4)))
        # Out of order, some batches landed past a gap; the device resends everything from its ack.
        for batch in batches:
            stores[1].ingest("cam-1", batch)

        assert stores[1].seqs("cam-1") == list(range(1, 601))
        reconciliation = stores[0].reconcile("cam-1")
        assert (reconciliation.acked_seq, reconciliation.stored, reconciliation.evicted) == (600, 600, 0)
        assert reconciliation.duplicates_total == 600
    finally:
        first.close()
        second.close()
