"""Reading for upload: batch coverage and declared evictions, in-doubt marks, acks."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from edge_runtime.errors import InvalidInput
from edge_runtime.outbox import Outbox
from edge_runtime.outbox._policy import record_bytes
from edge_runtime.outbox._record import record_checksum
from edgefleet.proto.edgefleet.v1 import results_pb2
from tests.edge_runtime.outbox.conftest import MakeRecord, OpenOutbox, payload_of, rows

BIG = 1 << 30


def fill(outbox: Outbox, make_record: MakeRecord, n: int, **kw: int) -> list[int]:
    futures = [outbox.append(make_record(i, **kw)) for i in range(n)]
    return [f.result(timeout=10) for f in futures]


def test_a_batch_carries_records_as_protobufs_with_the_counters(
    open_outbox: OpenOutbox, make_record: MakeRecord
) -> None:
    outbox = open_outbox()
    record = make_record(7, size=50, priority=3)
    seq = outbox.append(record).result(timeout=10)
    batch = outbox.read_batch(100, BIG)
    assert (batch.after_seq, batch.through_seq, batch.produced_total, batch.evicted_total) == (0, 1, 1, 0)
    (got,) = batch.records
    assert got == results_pb2.ResultRecord(
        seq=seq,
        created_at_ms=record.created_at_ms,
        model="digits",
        version=1,
        priority=3,
        kind=results_pb2.RECORD_KIND_RESULT,
        payload_type="inference.ModelInferResponse",
        payload=payload_of(7, 50),
        request_id="req-7",
        checksum=record_checksum(
            seq, record.created_at_ms, "digits", 1, 3, 1, "inference.ModelInferResponse", payload_of(7, 50), "req-7"
        ),
    )
    assert batch.message.record_checksum == results_pb2.RECORD_CHECKSUM_CRC32
    assert batch.message.records[0] == got  # the ResultBatch to send is built already


def test_a_batch_cut_by_max_records_ends_at_its_last_record(open_outbox: OpenOutbox, make_record: MakeRecord) -> None:
    outbox = open_outbox()
    fill(outbox, make_record, 10)
    batch = outbox.read_batch(4, BIG)
    assert [r.seq for r in batch.records] == [1, 2, 3, 4]
    assert (batch.after_seq, batch.through_seq) == (0, 4)


def test_a_batch_cut_by_max_bytes_ends_at_its_last_record_and_takes_at_least_one(
    open_outbox: OpenOutbox, make_record: MakeRecord
) -> None:
    outbox = open_outbox()
    fill(outbox, make_record, 5, size=1000)
    one = record_bytes(1000, "digits", "inference.ModelInferResponse", "req-0")
    batch = outbox.read_batch(100, 2 * one + 1)
    assert [r.seq for r in batch.records] == [1, 2]
    assert batch.through_seq == 2
    tiny = outbox.read_batch(100, 1)  # a record larger than the batch limit still goes, alone
    assert [r.seq for r in tiny.records] == [1]
    assert tiny.through_seq == 1


def test_a_batch_that_takes_everything_covers_evictions_up_to_last_seq(
    open_outbox: OpenOutbox, make_record: MakeRecord
) -> None:
    outbox = open_outbox()
    # Priorities 2,1,2,1,...: eviction takes the odd seqs' priority-1 records first, oldest first.
    futures = [outbox.append(make_record(i, size=1000, priority=2 - i % 2)) for i in range(10)]
    assert [f.result(timeout=10) for f in futures] == list(range(1, 11))
    one = record_bytes(1000, "digits", "inference.ModelInferResponse", "req-0")
    outbox.set_limits(max_bytes=6 * one + one // 2, max_age_s=0).result(timeout=10)
    held = [seq for seq, _, _ in rows(outbox.path)]
    evicted = sorted(set(range(1, 11)) - set(held))
    assert evicted == [2, 4, 6, 8]  # lowest priority, oldest first, until back under the bound
    batch = outbox.read_batch(100, BIG)
    assert (batch.after_seq, batch.through_seq) == (0, 10)
    missing = set(range(batch.after_seq + 1, batch.through_seq + 1)) - {r.seq for r in batch.records}
    assert sorted(missing) == evicted
    assert (batch.produced_total, batch.evicted_total) == (10, 4)


def test_evictions_at_the_tail_are_declared_even_with_no_record_left(
    open_outbox: OpenOutbox, make_record: MakeRecord
) -> None:
    outbox = open_outbox()
    fill(outbox, make_record, 3, size=1000)
    outbox.set_limits(max_bytes=10, max_age_s=0).result(timeout=10)
    assert outbox.counters().depth == 0
    batch = outbox.next_batch(100, BIG)
    assert (batch.after_seq, batch.through_seq, len(batch.records), batch.evicted_total) == (0, 3, 0, 3)
    assert not batch.empty
    assert outbox.ack(batch.through_seq).result(timeout=10) == 3
    assert outbox.read_batch(100, BIG).empty


def test_acks_delete_records_up_to_the_ack_and_never_move_backwards(
    open_outbox: OpenOutbox, make_record: MakeRecord
) -> None:
    outbox = open_outbox()
    fill(outbox, make_record, 10)
    batch = outbox.next_batch(6, BIG)
    assert outbox.ack(batch.through_seq).result(timeout=10) == 6
    assert [seq for seq, _, _ in rows(outbox.path)] == [7, 8, 9, 10]
    assert outbox.ack(3).result(timeout=10) == 6  # a late ack changes nothing
    c = outbox.counters()
    assert (c.acked_seq, c.depth, c.delivered_total, c.produced_total) == (6, 4, 6, 10)
    following = outbox.read_batch(100, BIG)
    assert following.after_seq == 6
    assert [r.seq for r in following.records] == [7, 8, 9, 10]


def test_an_ack_beyond_last_seq_is_refused_and_changes_nothing(
    open_outbox: OpenOutbox, make_record: MakeRecord
) -> None:
    outbox = open_outbox()
    fill(outbox, make_record, 3)
    with pytest.raises(InvalidInput, match="ack of seq 4 refused: the outbox's last seq is 3"):
        outbox.ack(4).result(timeout=10)
    with pytest.raises(InvalidInput, match="in-doubt mark 9 refused"):
        outbox.mark_in_doubt(9).result(timeout=10)
    c = outbox.counters()
    assert (c.acked_seq, c.in_doubt_seq, c.depth) == (0, 0, 3)
    assert outbox.append(make_record()).result(timeout=10) == 4  # the writer carries on


def test_in_doubt_records_survive_eviction_until_acked(open_outbox: OpenOutbox, make_record: MakeRecord) -> None:
    outbox = open_outbox()
    fill(outbox, make_record, 6, size=1000, priority=0)
    batch = outbox.next_batch(3, BIG)  # seqs 1-3 are now in doubt (persisted)
    assert outbox.counters().in_doubt_seq == 3
    outbox.set_limits(max_bytes=10, max_age_s=0).result(timeout=10)
    assert [seq for seq, _, _ in rows(outbox.path)] == [1, 2, 3]  # the bound gives way by one batch
    assert outbox.counters().evicted_total == 3
    outbox.ack(batch.through_seq).result(timeout=10)
    assert outbox.counters().depth == 0


def test_mark_in_doubt_reports_an_eviction_that_raced_the_read(
    open_outbox: OpenOutbox, make_record: MakeRecord
) -> None:
    outbox = open_outbox()
    fill(outbox, make_record, 5, size=1000)
    batch = outbox.read_batch(5, BIG)
    outbox.set_limits(max_bytes=10, max_age_s=0).result(timeout=10)  # evicts between the read and the mark
    held = outbox.mark_in_doubt(batch.through_seq).result(timeout=10)
    assert held == 0 < len(batch.records)  # so the uploader must not send this batch: read again
    again = outbox.read_batch(5, BIG)
    assert (again.after_seq, again.through_seq, len(again.records), again.evicted_total) == (0, 5, 0, 5)


def test_the_in_doubt_mark_is_persisted(outbox_path: Path, open_outbox: OpenOutbox, make_record: MakeRecord) -> None:
    outbox = open_outbox()
    fill(outbox, make_record, 4)
    assert outbox.mark_in_doubt(3).result(timeout=10) == 3
    assert dict(rows(outbox_path, "SELECT name, value FROM counters"))["in_doubt_seq"] == 3
    outbox.close()
    reopened = open_outbox(max_bytes=10)  # in doubt across a restart: still spared
    reopened.flush().result(timeout=10)
    assert [seq for seq, _, _ in rows(outbox_path)] == [1, 2, 3]


def test_reads_run_beside_appends_on_other_threads(open_outbox: OpenOutbox, make_record: MakeRecord) -> None:
    outbox = open_outbox(commit_interval_s=0.001)
    done = threading.Event()
    problems: list[BaseException] = []
    batches = 0

    def uploader() -> None:
        nonlocal batches
        try:
            while not done.is_set():
                batch = outbox.next_batch(50, BIG)
                seqs = [r.seq for r in batch.records]
                assert seqs == sorted(seqs) and all(batch.after_seq < s <= batch.through_seq for s in seqs)
                if not batch.empty:
                    outbox.ack(batch.through_seq).result(timeout=10)
                    batches += 1
        except BaseException as exc:
            problems.append(exc)

    thread = threading.Thread(target=uploader)
    thread.start()
    fill(outbox, make_record, 2000)
    outbox.flush().result(timeout=10)
    done.set()
    thread.join(10)
    assert not problems
    assert batches > 0
    c = outbox.counters()
    assert c.produced_total == c.depth + c.delivered_total + c.evicted_total == 2000


def test_next_batches_marks_a_whole_run_in_doubt_with_one_mark(
    open_outbox: OpenOutbox, make_record: MakeRecord
) -> None:
    outbox = open_outbox()
    fill(outbox, make_record, 10, size=1000, priority=0)
    batches = outbox.next_batches(3, 3, BIG)
    assert [(b.after_seq, b.through_seq) for b in batches] == [(0, 3), (3, 6), (6, 9)]
    assert outbox.counters().in_doubt_seq == 9
    outbox.set_limits(max_bytes=10, max_age_s=0).result(timeout=10)
    assert [seq for seq, _, _ in rows(outbox.path)] == list(range(1, 10))  # the whole run is spared
    follow_on = outbox.next_batches(3, 3, BIG, after_seq=9)  # what the uploader reads while 1-9 await their ack
    assert [(b.after_seq, b.through_seq, len(b.records)) for b in follow_on] == [(9, 10, 0)]  # 10 was evicted
    assert outbox.next_batches(3, 3, BIG, after_seq=10) == []
