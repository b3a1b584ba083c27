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


def test_a_replay_changes_nothing_but_the_duplicate_count(store: ResultStore, device: str) -> None:
    store.ingest(device, make_batch(0, 5, produced_total=5))
    store.ingest(device, make_batch(5, 10, [6, 8, 10], produced_total=10, evicted_total=2))
    before = _state(store, device)

    # The device sends (0, 5] again with its current counters (its ack was lost, say).
    outcome = store.ingest(device, make_batch(0, 5, produced_total=10, evicted_total=2))

    assert outcome == IngestOutcome(acked_seq=10, stored=0, duplicates=5, evicted=0)
    after = _state(store, device)
    assert after[1:] == before[1:]
    assert after[0] == Reconciliation(**{**before[0].__dict__, "duplicates_total": before[0].duplicates_total + 5})


def test_a_stale_replay_whose_counters_are_below_what_the_cloud_counted_is_refused(
    store: ResultStore, device: str
) -> None:
    """A batch read before the cloud counted seqs past its produced_total (an old stream that outlived its agent)
    contradicts the ledger: refused, nothing changes; the device's current stream sends the range again."""
    store.ingest(device, make_batch(0, 5, produced_total=5))
    store.ingest(device, make_batch(5, 10, [6, 8, 10], produced_total=10, evicted_total=2))
    before = _state(store, device)

    with pytest.raises(InvalidBatch, match="produced_total 5 is below seq 10"):
        store.ingest(device, make_batch(0, 5, produced_total=5))

    assert _state(store, device) == before


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
    assert store.ingest(device, make_batch(0, 1000, [], evicted_total=1000)) == IngestOutcome(1000, 0, 0, 1000)
    assert store.eviction_ranges(device) == [(1, 1000)]


def test_a_batch_past_a_gap_is_stored_but_not_acked(store: ResultStore, device: str) -> None:
    store.ingest(device, make_batch(0, 10))

    outcome = store.ingest(device, make_batch(20, 30, [21, 25], evicted_total=8))  # the cloud lacks 11..20

    assert outcome == IngestOutcome(acked_seq=10, stored=2, duplicates=0, evicted=0)
    assert store.eviction_ranges(device) == []
    reconciliation = store.reconcile(device)
    assert (reconciliation.acked_seq, reconciliation.max_stored_seq, reconciliation.evicted) == (10, 25, 0)


def test_the_gap_filled_then_the_batch_resent(store: ResultStore, device: str) -> None:
    # The device's counters when it sent these: 30 produced, 16 evicted (8 in (10, 20], 8 in (20, 30]).
    counters = {"produced_total": 30, "evicted_total": 16}
    store.ingest(device, make_batch(0, 10, **counters))
    store.ingest(device, make_batch(20, 30, [21, 25], **counters))

    filled = store.ingest(device, make_batch(10, 20, [11, 12], **counters))
    assert filled == IngestOutcome(acked_seq=20, stored=2, duplicates=0, evicted=8)

    # The device never saw an ack past 20 for (20, 30]: it sends it again; evictions count only now.
    resent = store.ingest(device, make_batch(20, 30, [21, 25], **counters))
    assert resent == IngestOutcome(acked_seq=30, stored=0, duplicates=2, evicted=8)
    assert store.eviction_ranges(device) == [(13, 20), (22, 24), (26, 30)]
    reconciliation = store.reconcile(device)
    assert reconciliation.stored + reconciliation.evicted == reconciliation.acked_seq == 30


def test_records_stored_past_a_gap_are_not_counted_evicted_by_a_later_batch(store: ResultStore, device: str) -> None:
    """A batch that covers seqs an earlier gap batch stored, without those records, must not count them evicted."""
    counters = {"produced_total": 25, "evicted_total": 23}  # even a device that says 3..25 were evicted
    store.ingest(device, make_batch(10, 20, **counters))  # gap: 1..10 missing
    outcome = store.ingest(device, make_batch(0, 25, [1, 2], **counters))

    assert outcome.acked_seq == 25
    assert outcome.evicted == 25 - 2 - 10  # 3..10 and 21..25
    assert store.eviction_ranges(device) == [(3, 10), (21, 25)]
    reconciliation = store.reconcile(device)
    assert reconciliation.stored + reconciliation.evicted == 25


def test_an_overlapping_batch_stores_only_the_new_records(store: ResultStore, device: str) -> None:
    store.ingest(device, make_batch(0, 10, [1, 2, 3], produced_total=15, evicted_total=11))  # 4..10 evicted

    # Overlaps the watermark, and still holds seq 5, which it declared evicted before: not stored now.
    outcome = store.ingest(device, make_batch(2, 15, [3, 5, 12], produced_total=15, evicted_total=11))

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
        (make_batch(0, 3, [1, 9], produced_total=9), "past through_seq"),
        (make_batch(0, 11), "11 records in one batch: the limit is 10"),
        (make_batch(0, 4, [3, 4], rejected=[4]), "both among the records and declared rejected"),
        # Counters that contradict the batch (the outside report's two).
        (make_batch(12, 10**15, [], produced_total=12, evicted_total=0), "past the device's own produced_total 12"),
        (make_batch(2, 5, [], produced_total=2, evicted_total=0), "past the device's own produced_total 2"),
        # Counters that contradict what the cloud counted: 2 seqs acked already, so at least 2 produced.
        (make_batch(1, 1, produced_total=1, evicted_total=0), "produced_total 1 is below seq 2"),
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


def test_contradicting_batches_are_refused_and_the_next_real_record_is_stored(store: ResultStore, device: str) -> None:
    """The outside report: with its own token a device could move its watermark to 10**15, after which its next
    real record was acknowledged without being stored (and the device deleted it)."""
    store.ingest(device, make_batch(0, 12))
    before = _state(store, device)
    for bad in (
        make_batch(12, 10**15, [], produced_total=12, evicted_total=0),
        make_batch(12, 15, [], produced_total=12, evicted_total=3),
    ):
        with pytest.raises(InvalidBatch, match="past the device's own produced_total 12"):
            store.ingest(device, bad)
        assert _state(store, device) == before

    assert store.ingest(device, make_batch(12, 13)) == IngestOutcome(acked_seq=13, stored=1, duplicates=0, evicted=0)
    assert store.seqs(device)[-1] == 13


def test_a_stale_batch_that_would_count_more_evictions_than_it_declares_is_refused(
    store: ResultStore, device: str
) -> None:
    store.ingest(device, make_batch(0, 10, [1, 2], produced_total=10, evicted_total=8))
    with pytest.raises(InvalidBatch, match="count 10 seqs evicted .* more than the device's evicted_total 9"):
        store.ingest(device, make_batch(10, 12, [], produced_total=12, evicted_total=9))
    assert store.reconcile(device).evicted == 8


# --- quarantine: no record wedges the stream ----------------------------------------------------------------


def _ledger(store: ResultStore, device_id: str) -> tuple[int, int, int, int]:
    r = store.reconcile(device_id)
    return r.stored, r.evicted, r.rejected, r.device_produced


def test_a_record_the_cloud_cannot_accept_is_quarantined_and_the_stream_moves_past_it(
    store: ResultStore, device: str
) -> None:
    records = [make_record(1), make_record(2, kind=42), make_record(3, model="dig\0its"), make_record(4)]

    outcome = store.ingest(device, make_batch(0, 4, records=records))

    assert (outcome.acked_seq, outcome.stored, outcome.rejected, outcome.duplicates) == (4, 2, 2, 0)
    assert outcome.rejected_seqs == (2, 3)  # the device counts these as rejected when it deletes them
    assert [seq for seq, _ in outcome.quarantined] == [2, 3]
    assert store.seqs(device) == [1, 4]
    assert _ledger(store, device) == (2, 0, 2, 4)  # stored + evicted + rejected = produced
    entries = store.quarantine(device)
    assert [(e.seq, e.source) for e in entries] == [(2, "cloud"), (3, "cloud")]
    assert "kind 42 is not a known RecordKind" in entries[0].reason
    assert "model contains a NUL character" in entries[1].reason
    # What arrived is kept for the operator, NUL and all.
    assert results_pb2.ResultRecord.FromString(entries[1].record or b"").model == "dig\0its"
    assert entries[1].record_size == len(records[2].SerializeToString())
    # The stream goes on.
    assert store.ingest(device, make_batch(4, 6)).acked_seq == 6
    assert store.seqs(device) == [1, 4, 5, 6]


def test_a_wrong_checksum_is_quarantined_not_stored(store: ResultStore, device: str) -> None:
    damaged = make_record(2)
    damaged.payload = b"payload-X"  # changed after the device computed its checksum
    outcome = store.ingest(device, make_batch(0, 3, records=[make_record(1), damaged, make_record(3)]))
    assert (outcome.acked_seq, outcome.stored, outcome.rejected_seqs) == (3, 2, (2,))
    [entry] = store.quarantine(device)
    assert "does not match the record's contents" in entry.reason
    # Stored rows keep the checksum they were verified with.
    assert [(r.seq, r.checksum) for r in store.results(device)] == [
        (1, make_record(1).checksum),
        (3, make_record(3).checksum),
    ]


def test_a_resent_stream_names_the_rejected_seqs_again_and_counts_them_once(store: ResultStore, device: str) -> None:
    """The ack that named a rejected seq was lost: the device sends the range again, and must hear of it again."""
    batch = make_batch(0, 3, records=[make_record(1), make_record(2, kind=0), make_record(3)])
    first = store.ingest(device, batch)

    again = store.ingest(device, batch)

    assert first.rejected_seqs == again.rejected_seqs == (2,)
    assert (again.stored, again.rejected, again.duplicates) == (0, 0, 3)
    assert _ledger(store, device) == (2, 0, 1, 3)
    # A resend that overlaps the watermark and carries more records names it too.
    overlap = store.ingest(
        device, make_batch(1, 5, records=[make_record(s) if s != 2 else batch.records[1] for s in range(2, 6)])
    )
    assert overlap.rejected_seqs == (2,) and overlap.stored == 2
    assert _ledger(store, device) == (4, 0, 1, 5)


def test_rejections_the_device_declares_are_counted_once_and_acknowledged(store: ResultStore, device: str) -> None:
    outcome = store.ingest(device, make_batch(0, 6, [1, 2, 4, 6], rejected=[3, 5]))

    assert (outcome.acked_seq, outcome.stored, outcome.rejected, outcome.evicted) == (6, 4, 2, 0)
    assert outcome.rejected_seqs == (3, 5)
    assert [(e.seq, e.source, e.record) for e in store.quarantine(device)] == [(3, "device", None), (5, "device", None)]
    assert store.reconcile(device).device_rejected == 2
    again = store.ingest(device, make_batch(0, 6, [1, 2, 4, 6], rejected=[3, 5]))
    assert (again.rejected, again.rejected_seqs) == (0, (3, 5))
    assert _ledger(store, device) == (4, 0, 2, 6)


def test_a_declared_rejection_of_a_seq_the_cloud_stored_is_not_counted(store: ResultStore, device: str) -> None:
    """Sent and stored, ack lost, then the device found the record damaged: it stays stored (and unnamed, so
    the device counts it delivered after all)."""
    store.ingest(device, make_batch(0, 3, produced_total=3))
    outcome = store.ingest(device, make_batch(0, 3, [1, 3], rejected=[2], rejected_total=1))
    assert (outcome.acked_seq, outcome.rejected, outcome.rejected_seqs) == (3, 0, ())
    assert _ledger(store, device) == (3, 0, 0, 3)

    # Past a gap the same holds: a seq stored by an earlier batch is not also quarantined.
    store.ingest(device, make_batch(5, 8, produced_total=8, evicted_total=2))  # 4, 5 missing so far
    late = store.ingest(
        device, make_batch(3, 8, [7, 8], rejected=[6], produced_total=8, evicted_total=2, rejected_total=1)
    )
    assert (late.acked_seq, late.rejected, late.rejected_seqs) == (8, 0, ())
    assert _ledger(store, device) == (6, 2, 0, 8)


def test_records_quarantined_past_a_gap_are_not_counted_as_evicted(store: ResultStore, device: str) -> None:
    counters = {"produced_total": 10, "evicted_total": 2}
    gap = store.ingest(
        device, make_batch(5, 10, records=[make_record(s, kind=0 if s == 7 else 1) for s in range(6, 11)], **counters)
    )
    assert (gap.acked_seq, gap.stored, gap.rejected, gap.rejected_seqs) == (0, 4, 1, ())  # nothing acked yet

    filled = store.ingest(device, make_batch(0, 5, [1, 2, 3], **counters))  # 4, 5 evicted

    assert (filled.acked_seq, filled.evicted) == (5, 2)
    resent = store.ingest(
        device, make_batch(5, 10, records=[make_record(s, kind=0 if s == 7 else 1) for s in range(6, 11)], **counters)
    )
    assert (resent.acked_seq, resent.evicted, resent.rejected, resent.rejected_seqs) == (10, 0, 0, (7,))
    assert _ledger(store, device) == (7, 2, 1, 10)
    assert store.eviction_ranges(device) == [(4, 5)]


# --- clocks --------------------------------------------------------------------------------------------------------


def test_a_record_from_a_fast_clock_is_stored_and_the_skew_counted(store: ResultStore, device: str) -> None:
    """The outside report: one record stamped 8 days ahead was refused, and the device's stream stopped there."""
    ahead = int(time.time() * 1000) + 8 * 24 * 3600 * 1000
    records = [make_record(1), make_record(2, created_at_ms=ahead), make_record(3, created_at_ms=-5)]

    outcome = store.ingest(device, make_batch(0, 3, records=records))

    assert (outcome.acked_seq, outcome.stored, outcome.rejected) == (3, 3, 0)
    stored = {r.seq: r for r in store.results(device)}
    assert (stored[2].created_at_ms, stored[3].created_at_ms) == (ahead, -5)
    assert stored[2].received_at_ms < ahead
    r = store.reconcile(device)
    assert r.clock_skewed_total == 1
    assert 8 * 24 * 3600 * 1000 - 60_000 < r.max_clock_skew_ms <= 8 * 24 * 3600 * 1000
    store.ingest(device, make_batch(0, 3, records=records))  # a resend counts nothing twice
    assert store.reconcile(device).clock_skewed_total == 1


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
    kept = [s for s in range(1, size * count + 1) if s % 7]
    # What the device reports once it produced all of them: batches in flight at once all carry these.
    counters = {"produced_total": size * count, "evicted_total": size * count - len(kept)}
    batches = [
        make_batch(k * size, (k + 1) * size, [s for s in range(k * size + 1, (k + 1) * size + 1) if s % 7], **counters)
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
        batches = [make_batch(k * 20, (k + 1) * 20, produced_total=600) for k in range(30)]

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


def test_the_quarantine_of_an_unknown_device_is_not_found(store: ResultStore, device: str) -> None:
    assert store.quarantine(device) == []  # registered, nothing quarantined
    with pytest.raises(NotFound, match="'nobody'"):
        store.quarantine("nobody")


# --- several batches of a stream in one transaction (the Uplink's read-ahead) ---------------------------------


def _stream() -> list[results_pb2.ResultBatch]:
    """Three consecutive batches, the second leaving seq 7 out (evicted on the device)."""
    return [
        make_batch(0, 5, produced_total=12, evicted_total=1),
        make_batch(5, 9, [6, 8, 9], produced_total=12, evicted_total=1),
        make_batch(9, 12, produced_total=12, evicted_total=1),
    ]


def test_batches_stored_together_end_as_if_stored_one_by_one(store: ResultStore, registry: DeviceRegistry) -> None:
    registry.add_device("alone")
    registry.add_device("together")
    one_by_one = [store.ingest("alone", b) for b in _stream()]

    outcomes, refused = store.ingest_many("together", _stream())

    assert refused is None
    assert outcomes == one_by_one
    assert [o.acked_seq for o in outcomes] == [5, 9, 12]
    assert _state(store, "together") == _state(store, "alone")
    assert store.seqs("together") == [1, 2, 3, 4, 5, 6, 8, 9, 10, 11, 12]
    assert store.eviction_ranges("together") == [(7, 7)]


def test_a_refused_batch_among_those_stored_together_keeps_the_ones_before_and_applies_none_after(
    store: ResultStore, device: str
) -> None:
    first, second, third = _stream()
    second.records[0].seq = 4  # out of order: the whole batch is refused, as alone

    outcomes, refused = store.ingest_many(device, [first, second, third])

    assert isinstance(refused, InvalidBatch)
    assert "seqs must increase" in str(refused)
    assert [o.acked_seq for o in outcomes] == [5]
    assert store.seqs(device) == [1, 2, 3, 4, 5]
    assert store.reconcile(device).acked_seq == 5


def test_a_batch_refused_by_the_ledger_among_those_stored_together_changes_nothing_of_its_own(
    store: ResultStore, device: str
) -> None:
    first, second, third = _stream()
    # Valid alone, refused against the cloud's counters (in its savepoint): the cloud counted seq 7 evicted.
    third.evicted_total = 0

    outcomes, refused = store.ingest_many(device, [first, second, third])

    assert isinstance(refused, InvalidBatch)
    assert "evicted_total 0" in str(refused)
    assert [o.acked_seq for o in outcomes] == [5, 9]
    assert store.seqs(device) == [1, 2, 3, 4, 5, 6, 8, 9]
    reconciliation = store.reconcile(device)
    assert (reconciliation.acked_seq, reconciliation.stored, reconciliation.evicted) == (9, 8, 1)


def test_an_unknown_device_stores_nothing_together(store: ResultStore) -> None:
    outcomes, refused = store.ingest_many("nobody", _stream())

    assert outcomes == []
    assert isinstance(refused, NotFound)


@pytest.mark.parametrize("records", [1, 63, 64, 65, 200, 1000])
def test_batches_of_every_size_are_stored_whole(store: ResultStore, device: str, records: int) -> None:
    """SQLite inserts rows 64 at a time and then the rest: each size stores and counts every row once."""
    outcome = store.ingest(device, make_batch(0, records))
    again = store.ingest(device, make_batch(0, records + 1))

    assert (outcome.stored, outcome.duplicates) == (records, 0)
    assert (again.stored, again.duplicates) == (1, records)
    assert store.seqs(device) == list(range(1, records + 2))
