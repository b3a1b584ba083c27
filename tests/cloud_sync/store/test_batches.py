"""The upload protocol's pure rules: batch validation, placement against the watermark, evicted ranges."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cloud_sync.errors import InvalidBatch
from cloud_sync.store.batches import (
    MAX_SEQ,
    ROW_COLUMNS,
    IngestLimits,
    Placement,
    missing_ranges,
    place,
    validate_batch,
)
from edgefleet.proto.edgefleet.v1 import results_pb2
from tests.cloud_sync.store.conftest import make_batch, make_record

NOW_MS = 1_800_000_000_000
LIMITS = IngestLimits()


def test_a_valid_batch_becomes_rows_in_column_order() -> None:
    batch = make_batch(10, 15, [11, 13, 15], produced_total=20, evicted_total=2)

    valid = validate_batch("cam-1", batch, LIMITS, NOW_MS)

    assert (valid.after_seq, valid.through_seq) == (10, 15)
    assert valid.seqs == [11, 13, 15]
    assert (valid.device_produced_total, valid.device_evicted_total) == (20, 2)
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
    }


def test_an_empty_batch_is_valid_and_may_declare_evictions() -> None:
    assert validate_batch("cam-1", make_batch(0, 0), LIMITS, NOW_MS).seqs == []
    assert validate_batch("cam-1", make_batch(0, 50, []), LIMITS, NOW_MS).seqs == []


def _problem(batch: results_pb2.ResultBatch, limits: IngestLimits = LIMITS) -> str:
    with pytest.raises(InvalidBatch) as caught:
        validate_batch("cam-1", batch, limits, NOW_MS)
    return str(caught.value)


@pytest.mark.parametrize(
    ("batch", "reason"),
    [
        (make_batch(10, 5, []), "through_seq 5 is below after_seq 10"),
        (make_batch(0, 3, [1, 3, 2]), "record 2: seq 2 does not follow the previous record's seq 3"),
        (make_batch(0, 3, [1, 1, 2]), "record 1: seq 1 does not follow the previous record's seq 1"),
        (make_batch(5, 9, [5, 6]), "record 0: seq 5 does not follow after_seq 5"),
        (make_batch(0, 3, [0, 1]), "record 0: seq 0 does not follow after_seq 0"),
        (make_batch(0, 3, [1, 4]), "record seq 4 is past through_seq 3"),
        (make_batch(0, MAX_SEQ + 1, []), "past the largest seq"),
        (make_batch(0, 1, produced_total=MAX_SEQ + 1), "produced_total"),
        (make_batch(0, 1, records=[make_record(1, kind=0)]), "record 0 (seq 1): kind 0 is not a known RecordKind"),
        (make_batch(0, 1, records=[make_record(1, kind=9)]), "kind 9 is not a known RecordKind"),
        (make_batch(0, 1, records=[make_record(1, created_at_ms=-1)]), "created_at_ms -1 is before the epoch"),
        (make_batch(0, 1, records=[make_record(1, created_at_ms=NOW_MS * 2)]), "ms ahead of the cloud"),
        (make_batch(0, 1, records=[make_record(1, model="m" * 129)]), "model is 129 characters: the limit is 128"),
        (make_batch(0, 1, records=[make_record(1, payload_type="t" * 257)]), "payload_type is 257 characters"),
        (make_batch(0, 1, records=[make_record(1, request_id="r" * 129)]), "request_id is 129 characters"),
        (make_batch(0, 1, records=[make_record(1, model="a\0b")]), "model contains a NUL character"),
        (make_batch(0, 1, records=[make_record(1, request_id="\0")]), "request_id contains a NUL character"),
    ],
)
def test_invalid_batches_are_refused_with_the_reason(batch: results_pb2.ResultBatch, reason: str) -> None:
    assert reason in _problem(batch)


def test_a_bad_string_is_found_after_good_records_with_the_same_strings() -> None:
    records = [make_record(1), make_record(2), make_record(3, payload_type="x" * 300)]
    assert "record 2 (seq 3): payload_type is 300 characters" in _problem(make_batch(0, 3, records=records))


def test_the_record_and_byte_limits_are_configurable() -> None:
    batch = make_batch(0, 4)  # payloads b"payload-N": 9 bytes each, 36 in all
    assert "4 records in one batch: the limit is 3" in _problem(batch, IngestLimits(max_records=3))
    assert "total 36 bytes: the limit is 35" in _problem(batch, IngestLimits(max_payload_bytes=35))
    validate_batch("cam-1", batch, IngestLimits(max_records=4, max_payload_bytes=36), NOW_MS)


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
