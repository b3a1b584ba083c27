"""The upload protocol's pure rules: batch validation, records sorted into stored and quarantined, placement
against the watermark, evicted ranges, and the ledger a batch implies against the counters on both sides."""

from __future__ import annotations

import struct
import zlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cloud_sync.errors import InvalidBatch
from cloud_sync.store.batches import MAX_SEQ, ROW_COLUMNS, IngestLimits, ValidBatch, record_checksum, validate_batch
from cloud_sync.store.ledger import DeviceLedger, Placement, check_ledger, merge_seqs, missing_ranges, place
from edgefleet import records
from edgefleet.proto.edgefleet.v1 import results_pb2
from tests.cloud_sync.store.conftest import make_batch, make_record

NOW_MS = 1_800_000_000_000
LIMITS = IngestLimits()
DAY_MS = 24 * 3600 * 1000


def test_a_valid_batch_becomes_rows_in_column_order() -> None:
    batch = make_batch(10, 15, [11, 13, 15], produced_total=20, evicted_total=2)

    valid = validate_batch("cam-1", batch, LIMITS, NOW_MS)

    assert (valid.after_seq, valid.through_seq) == (10, 15)
    assert valid.seqs == [11, 13, 15]
    assert (valid.device_produced_total, valid.device_evicted_total, valid.device_rejected_total) == (20, 2, 0)
    assert valid.quarantined == valid.declared == [] and valid.skewed == {}
    row = dict(zip(ROW_COLUMNS, valid.rows[1], strict=True))
    record = batch.records[1]
    assert row == {
        "device_id": "cam-1",
        "seq": 13,
        "created_at_ms": record.created_at_ms,
        "model": "digits",
        "version": 2,
        "priority": 1,
        "kind": results_pb2.RECORD_KIND_RESULT,
        "payload_type": "inference.ModelInferResponse",
        "payload": b"payload-13",
        "request_id": "req-13",
        "received_at_ms": NOW_MS,
        "checksum": record.checksum,
    }


def test_an_empty_batch_is_valid_and_may_declare_evictions() -> None:
    assert validate_batch("cam-1", make_batch(0, 0), LIMITS, NOW_MS).seqs == []
    assert validate_batch("cam-1", make_batch(0, 50, [], evicted_total=50), LIMITS, NOW_MS).seqs == []


# --- the checksum ------------------------------------------------------------------------------------------------


def test_the_checksum_is_the_one_the_proto_specifies() -> None:
    record = make_record(1)
    header = struct.pack("<8q", 1, record.created_at_ms, 2, 1, 1, 6, len("inference.ModelInferResponse"), 5)
    spec = zlib.crc32(header + b"digits" + b"inference.ModelInferResponse" + b"req-1" + b"payload-1")
    assert record_checksum(record) == spec == 2209741679  # frozen: devices in the field compute this


@given(
    seq=st.integers(1, MAX_SEQ),
    created=st.integers(-(2**63), 2**63 - 1),
    model=st.text(max_size=20).filter(lambda t: "\0" not in t),
    version=st.integers(0, 2**32 - 1),
    priority=st.integers(0, 2**32 - 1),
    kind=st.sampled_from([1, 2, 3]),
    payload_type=st.text(max_size=20).filter(lambda t: "\0" not in t),
    payload=st.binary(max_size=5000),
    request_id=st.text(max_size=20).filter(lambda t: "\0" not in t),
)
def test_ingest_checks_the_checksum_the_device_computes(
    seq: int,
    created: int,
    model: str,
    version: int,
    priority: int,
    kind: int,
    payload_type: str,
    payload: bytes,
    request_id: str,
) -> None:
    """validate_batch computes the checksum inline (its hot loop); it must agree with the shared rule the device
    uses (edgefleet.records), for short payloads (one joined crc32) and long ones (chained) alike."""
    record = results_pb2.ResultRecord(
        seq=seq,
        created_at_ms=created,
        model=model,
        version=version,
        priority=priority,
        kind=kind,  # type: ignore[arg-type]
        payload_type=payload_type,
        payload=payload,
        request_id=request_id,
    )
    record.checksum = records.record_checksum(
        seq, created, model, version, priority, kind, payload_type, payload, request_id
    )
    batch = results_pb2.ResultBatch(
        records=[record],
        after_seq=seq - 1,
        through_seq=seq,
        produced_total=seq,
        record_checksum=results_pb2.RECORD_CHECKSUM_CRC32,
    )
    valid = validate_batch("cam-1", batch, LIMITS, NOW_MS)
    assert valid.seqs == [seq] and not valid.quarantined
    batch.records[0].checksum ^= 1
    assert [q.seq for q in validate_batch("cam-1", batch, LIMITS, NOW_MS).quarantined] == [seq]


# --- batch-level refusals ------------------------------------------------------------------------------------------


def _problem(batch: results_pb2.ResultBatch, limits: IngestLimits = LIMITS) -> str:
    with pytest.raises(InvalidBatch) as caught:
        validate_batch("cam-1", batch, limits, NOW_MS)
    return str(caught.value)


def _unknown_checksum() -> results_pb2.ResultBatch:
    batch = make_batch(0, 1)
    batch.record_checksum = 7  # type: ignore[assignment]
    return batch


@pytest.mark.parametrize(
    ("batch", "reason"),
    [
        (make_batch(10, 5, []), "through_seq 5 is below after_seq 10"),
        (make_batch(0, 3, [1, 3, 2]), "record 2: seq 2 does not follow the previous record's seq 3"),
        (make_batch(0, 3, [1, 1, 2]), "record 1: seq 1 does not follow the previous record's seq 1"),
        (make_batch(5, 9, [5, 6]), "record 0: seq 5 does not follow after_seq 5"),
        (make_batch(0, 3, [0, 1]), "record 0: seq 0 does not follow after_seq 0"),
        (make_batch(0, 3, [1, 4], produced_total=4), "record 1: seq 4 is past through_seq 3"),
        (
            make_batch(0, 3, records=[make_record(1), make_record(2**64 - 1, created_at_ms=0, checksum=0)]),
            "record 1: seq 18446744073709551615 is past through_seq 3",
        ),
        (make_batch(0, MAX_SEQ + 1, [], evicted_total=0), "past the largest seq"),
        (make_batch(0, 1, produced_total=MAX_SEQ + 1), "produced_total"),
        (make_batch(0, 1, rejected_total=MAX_SEQ + 1), "rejected_total"),
        (_unknown_checksum(), "record_checksum 7 is not a RecordChecksum"),
        (make_batch(0, 4, [1, 2], rejected=[4, 3], evicted_total=0), "rejection 1: seq 3 is not in (4, 4]"),
        (make_batch(0, 4, [1, 2, 3], rejected=[3], evicted_total=0), "seq 3 is both among the records and declared"),
        (make_batch(2, 4, [3, 4], rejected=[2], evicted_total=0), "rejection 0: seq 2 is not in (2, 4]"),
    ],
)
def test_protocol_violations_are_refused_whole_with_the_reason(batch: results_pb2.ResultBatch, reason: str) -> None:
    assert reason in _problem(batch)


@pytest.mark.parametrize(
    ("batch", "reason"),
    [
        # The outside report: an empty batch that would move the watermark to 10**15 by a device that says it
        # produced 12, and one past the device's own counter by three.
        (make_batch(12, 10**15, [], produced_total=12, evicted_total=0), "through_seq 1000000000000000 is past"),
        (
            make_batch(2, 5, [], produced_total=2, evicted_total=0),
            "through_seq 5 is past the device's own produced_total 2",
        ),
        (
            make_batch(0, 10, [1, 2], evicted_total=3),
            "leaves out 8 seqs of (0, 10] (declared evicted) but the device's",
        ),
        (make_batch(0, 10, produced_total=10, evicted_total=6, rejected_total=5), "add up to more than its produced"),
        (make_batch(0, 10, [1, 2, 3], rejected=[4, 5], rejected_total=1, evicted_total=5), "declares 2 rejections"),
    ],
)
def test_counters_that_contradict_the_batch_are_refused(batch: results_pb2.ResultBatch, reason: str) -> None:
    assert reason in _problem(batch)


def test_the_record_and_byte_limits_of_a_batch_are_configurable() -> None:
    batch = make_batch(0, 4)  # payloads b"payload-N": 9 bytes each, 36 in all
    assert "4 records in one batch: the limit is 3" in _problem(batch, IngestLimits(max_records=3))
    assert "total 36 bytes: the limit is 35" in _problem(batch, IngestLimits(max_payload_bytes=35))
    validate_batch("cam-1", batch, IngestLimits(max_records=4, max_payload_bytes=36), NOW_MS)


# --- records quarantined, not refused -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("record", "reason"),
    [
        (make_record(2, kind=0), "kind 0 is not a known RecordKind"),
        (make_record(2, kind=9), "kind 9 is not a known RecordKind"),
        (make_record(2, model="m" * 129), "model is 129 characters: the limit is 128"),
        (make_record(2, payload_type="t" * 257), "payload_type is 257 characters"),
        (make_record(2, request_id="r" * 129), "request_id is 129 characters"),
        (make_record(2, model="a\0b"), "model contains a NUL character"),
        (make_record(2, request_id="\0"), "request_id contains a NUL character"),
        (make_record(2, payload=b"x" * (LIMITS.max_record_payload_bytes + 1)), "past the limit of 16777216 bytes"),
        (make_record(2, checksum=12345), "checksum 12345 does not match the record's contents"),
    ],
)
def test_a_record_the_cloud_cannot_accept_is_quarantined_with_its_reason(
    record: results_pb2.ResultRecord, reason: str
) -> None:
    batch = make_batch(0, 3, records=[make_record(1), record, make_record(3)])

    valid = validate_batch("cam-1", batch, LIMITS, NOW_MS)

    assert valid.seqs == [1, 3]  # the others are stored
    [quarantined] = valid.quarantined
    assert (quarantined.seq, quarantined.source) == (2, "cloud")
    assert reason in quarantined.reason
    # A bounded copy of what arrived, for the operator.
    serialized = record.SerializeToString()
    assert quarantined.record == serialized[: LIMITS.max_quarantined_bytes]
    assert quarantined.record_size == len(serialized)


def test_a_bad_string_is_found_after_good_records_with_the_same_strings() -> None:
    records = [make_record(1), make_record(2), make_record(3, payload_type="x" * 300), make_record(4)]
    valid = validate_batch("cam-1", make_batch(0, 4, records=records), LIMITS, NOW_MS)
    assert valid.seqs == [1, 2, 4]
    assert [(q.seq, q.reason) for q in valid.quarantined] == [(3, "payload_type is 300 characters: the limit is 256")]


def test_quarantined_payloads_do_not_count_against_the_batch_byte_limit() -> None:
    limits = IngestLimits(max_record_payload_bytes=100, max_payload_bytes=50)
    huge = make_record(2, payload=b"x" * 1000)
    valid = validate_batch("cam-1", make_batch(0, 2, records=[make_record(1), huge]), limits, NOW_MS)
    assert valid.seqs == [1] and [q.seq for q in valid.quarantined] == [2]


def test_records_from_an_agent_without_checksums_are_not_checked() -> None:
    batch = make_batch(0, 2, records=[make_record(1, checksum=0), make_record(2, checksum=0)], checksums=False)
    valid = validate_batch("cam-1", batch, LIMITS, NOW_MS)
    assert valid.seqs == [1, 2] and valid.quarantined == []
    assert [dict(zip(ROW_COLUMNS, row, strict=True))["checksum"] for row in valid.rows] == [None, None]


def test_declared_rejections_are_kept_with_their_reason_bounded() -> None:
    batch = make_batch(0, 5, [1, 2, 4], rejected=[3, 5])
    batch.rejected[1].reason = "bad\0page " + "x" * 1000

    valid = validate_batch("cam-1", batch, LIMITS, NOW_MS)

    assert [(d.seq, d.source, d.record) for d in valid.declared] == [(3, "device", None), (5, "device", None)]
    assert valid.declared[0].reason == "on the device: checksum mismatch"
    assert valid.declared[1].reason.startswith("on the device: bad?page xxx")
    assert len(valid.declared[1].reason) == len("on the device: ") + LIMITS.max_reason_chars


# --- timestamps are never a reason ----------------------------------------------------------------------------------


@pytest.mark.parametrize("created", [-(2**63), -1, 0, 1, NOW_MS, NOW_MS + 8 * DAY_MS, 2**63 - 1])
def test_any_timestamp_is_stored_as_reported(created: int) -> None:
    valid = validate_batch("cam-1", make_batch(0, 1, records=[make_record(1, created_at_ms=created)]), LIMITS, NOW_MS)
    assert valid.seqs == [1] and valid.quarantined == []
    assert dict(zip(ROW_COLUMNS, valid.rows[0], strict=True))["created_at_ms"] == created


def test_records_ahead_of_the_cloud_past_the_tolerance_are_counted_as_skewed() -> None:
    tolerance = LIMITS.clock_skew_tolerance_ms
    records = [
        make_record(1, created_at_ms=NOW_MS + tolerance),  # within: not skewed
        make_record(2, created_at_ms=NOW_MS + tolerance + 1),
        make_record(3, created_at_ms=NOW_MS + 8 * DAY_MS),
        make_record(4, created_at_ms=0),  # behind (a device without a clock) is not flagged
    ]
    valid = validate_batch("cam-1", make_batch(0, 4, records=records), LIMITS, NOW_MS)
    assert valid.skewed == {2: tolerance + 1, 3: 8 * DAY_MS}


# --- placement, ranges ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("after", "through", "watermark", "expected"),
    [
        (0, 10, 0, Placement.ADVANCES),
        (5, 10, 7, Placement.ADVANCES),  # overlaps what the cloud has
        (7, 10, 7, Placement.ADVANCES),
        (8, 10, 7, Placement.GAP),
        (0, 7, 7, Placement.REPLAY),
        (3, 5, 7, Placement.REPLAY),
        (7, 7, 7, Placement.REPLAY),  # an empty batch at the watermark: asks for the ack
    ],
)
def test_place(after: int, through: int, watermark: int, expected: Placement) -> None:
    assert place(after, through, watermark) is expected


def test_missing_ranges() -> None:
    assert missing_ranges(0, 5, [1, 2, 3, 4, 5]) == []
    assert missing_ranges(0, 5, []) == [(1, 5)]
    assert missing_ranges(10, 20, [11, 12, 15, 20]) == [(13, 14), (16, 19)]
    assert missing_ranges(10, 20, [14]) == [(11, 13), (15, 20)]
    assert missing_ranges(7, 7, []) == []


@given(st.integers(0, 50), st.integers(0, 60), st.data())
def test_missing_ranges_cover_exactly_the_absent_seqs(after: int, span: int, data: st.DataObject) -> None:
    through = after + span
    present = sorted(data.draw(st.sets(st.integers(after + 1, through)) if span else st.just(set[int]())))
    ranges = missing_ranges(after, through, present)
    covered = [seq for low, high in ranges for seq in range(low, high + 1)]
    assert covered == sorted(set(range(after + 1, through + 1)) - set(present))
    assert all(low <= high for low, high in ranges)
    # Maximal ranges: two ranges never touch.
    assert all(ranges[i][1] + 1 < ranges[i + 1][0] for i in range(len(ranges) - 1))


@given(st.lists(st.sets(st.integers(0, 100)), max_size=4))
def test_merge_seqs_is_the_sorted_union(parts: list[set[int]]) -> None:
    # Disjoint inputs, as ingest gives it: each seq in the first part that has it.
    seen: set[int] = set()
    lists = []
    for part in parts:
        lists.append(sorted(part - seen))
        seen |= part
    assert merge_seqs(*lists) == sorted(seen)


# --- the ledger -------------------------------------------------------------------------------------------------


def _batch(produced: int, evicted: int = 0, rejected: int = 0) -> ValidBatch:
    return ValidBatch(0, 0, [], [], produced, evicted, rejected)


def _ledger_problem(batch: ValidBatch, before: DeviceLedger, after: DeviceLedger) -> str:
    with pytest.raises(InvalidBatch) as caught:
        check_ledger(batch, before, after)
    return str(caught.value)


def test_a_device_that_reports_fewer_seqs_than_the_cloud_accounted_for_is_refused() -> None:
    before = DeviceLedger(acked_seq=10**15, device_produced=10**15)
    assert "produced_total 13 is below seq 1000000000000000" in _ledger_problem(_batch(13), before, before)
    gap = DeviceLedger(acked_seq=5, max_stored_seq=40)
    assert "below seq 40" in _ledger_problem(_batch(39), gap, gap)
    check_ledger(_batch(40), gap, gap)


def test_the_cloud_never_counts_more_than_the_device_declared() -> None:
    before = DeviceLedger(acked_seq=10, stored=6, evicted=3, rejected=1, rejected_on_device=1)
    more_evicted = DeviceLedger(acked_seq=20, stored=10, evicted=8, rejected=2, rejected_on_device=1)
    assert "count 8 seqs evicted" in _ledger_problem(_batch(20, evicted=7, rejected=2), before, more_evicted)
    check_ledger(_batch(20, evicted=8, rejected=2), before, more_evicted)
    more_declared = DeviceLedger(acked_seq=20, stored=10, evicted=8, rejected=2, rejected_on_device=2)
    assert "2 rejections declared" in _ledger_problem(_batch(20, evicted=8, rejected=1), before, more_declared)
    # Rejections by the cloud alone are the cloud's: the device learns of them only from the ack.
    by_cloud = DeviceLedger(acked_seq=20, stored=10, evicted=8, rejected=2, rejected_on_device=1)
    check_ledger(_batch(20, evicted=8, rejected=1), before, by_cloud)
    too_many = DeviceLedger(acked_seq=20, stored=11, evicted=8, rejected=2, rejected_on_device=1)
    assert "more than the device's produced_total 20" in _ledger_problem(_batch(20, 8, 1), before, too_many)
