"""The upload protocol's rules as plain functions: validate a ResultBatch, place it against the watermark,
find the seqs a batch declares evicted. No I/O here; results.py applies these decisions in a transaction.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass

from cloud_sync.errors import InvalidBatch
from edgefleet.proto.edgefleet.v1 import results_pb2

__all__ = [
    "MAX_SEQ",
    "ROW_COLUMNS",
    "IngestLimits",
    "Placement",
    "ValidBatch",
    "missing_ranges",
    "place",
    "validate_batch",
]

# Seqs and counters are uint64 on the wire but BIGINT (signed) in the store.
MAX_SEQ = 2**63 - 1

# RECORD_KIND_UNSPECIFIED (0) is refused: every record says what it is.
_KNOWN_KINDS = frozenset(v for v in results_pb2.RecordKind.values() if v != results_pb2.RECORD_KIND_UNSPECIFIED)


@dataclass(frozen=True)
class IngestLimits:
    """What one uploaded batch may hold; anything past a limit is refused whole with InvalidBatch."""

    # Records in one batch (the device's upload.batch_max_records must not exceed it).
    max_records: int = 10_000
    # The payload bytes of one batch, all records together (the strings beside them are bounded below). The
    # transport's message size limit bounds the batch before it is even parsed; this bounds what is stored.
    max_payload_bytes: int = 32 * 1024 * 1024
    # Characters of ResultRecord.model, .payload_type and .request_id.
    max_model_chars: int = 128
    max_payload_type_chars: int = 256
    max_request_id_chars: int = 128
    # How far past the cloud's clock a record's created_at_ms may be. Devices without a real-time clock may
    # report times back to the epoch, so only the future is bounded.
    max_future_skew_ms: int = 7 * 24 * 3600 * 1000


@dataclass(frozen=True)
class ValidBatch:
    """A batch that passed validation, with its records as rows ready for executemany.

    `rows[i]` is `(device_id, seq, created_at_ms, model, version, priority, kind, payload_type, payload,
    request_id, received_at_ms)` and `seqs[i]` its seq; seqs are strictly increasing.
    """

    after_seq: int
    through_seq: int
    seqs: list[int]
    rows: list[tuple[object, ...]]
    device_produced_total: int
    device_evicted_total: int


ROW_COLUMNS = (
    "device_id",
    "seq",
    "created_at_ms",
    "model",
    "version",
    "priority",
    "kind",
    "payload_type",
    "payload",
    "request_id",
    "received_at_ms",
)


def validate_batch(
    device_id: str, batch: results_pb2.ResultBatch, limits: IngestLimits, received_at_ms: int
) -> ValidBatch:
    """Check `batch` against the upload protocol and `limits`; raise InvalidBatch naming the first problem."""
    after, through = batch.after_seq, batch.through_seq
    if through < after:
        raise InvalidBatch(f"through_seq {through} is below after_seq {after}")
    if through > MAX_SEQ:
        raise InvalidBatch(f"through_seq {through} is past the largest seq the store keeps ({MAX_SEQ})")
    for name in ("produced_total", "evicted_total"):
        if getattr(batch, name) > MAX_SEQ:
            raise InvalidBatch(f"{name} {getattr(batch, name)} is past {MAX_SEQ}")
    records = batch.records
    if len(records) > limits.max_records:
        raise InvalidBatch(f"{len(records)} records in one batch: the limit is {limits.max_records}")

    max_created = received_at_ms + limits.max_future_skew_ms
    max_rid = limits.max_request_id_chars
    kinds = _KNOWN_KINDS
    seqs: list[int] = []
    rows: list[tuple[object, ...]] = []
    add_seq, add_row = seqs.append, rows.append
    previous = after
    payload_bytes = 0
    # Records of a batch nearly always share model and payload_type: check those only when they change.
    checked_model = checked_type = None
    # The hot loop of ingest (about 1 us a record): one pass, each field read once, checks cheap when they pass.
    for index, record in enumerate(records):
        seq = record.seq
        if seq <= previous:
            where = f"after_seq {after}" if index == 0 else f"the previous record's seq {previous}"
            raise InvalidBatch(f"record {index}: seq {seq} does not follow {where} (seqs must increase)")
        previous = seq
        created, model, payload_type, request_id, kind, payload = (
            record.created_at_ms,
            record.model,
            record.payload_type,
            record.request_id,
            record.kind,
            record.payload,
        )
        if kind not in kinds or not 0 <= created <= max_created or len(request_id) > max_rid or "\0" in request_id:
            raise InvalidBatch(f"record {index} (seq {seq}): {_record_problem(record, limits, max_created)}")
        if model != checked_model or payload_type != checked_type:
            problem = _string_problem(record, limits)
            if problem:
                raise InvalidBatch(f"record {index} (seq {seq}): {problem}")
            checked_model, checked_type = model, payload_type
        payload_bytes += len(payload)
        add_seq(seq)
        add_row(
            (
                device_id,
                seq,
                created,
                model,
                record.version,
                record.priority,
                kind,
                payload_type,
                payload,
                request_id,
                received_at_ms,
            )
        )
    if payload_bytes > limits.max_payload_bytes:
        raise InvalidBatch(
            f"payloads of the batch total {payload_bytes} bytes: the limit is {limits.max_payload_bytes}"
        )
    if previous > through:
        raise InvalidBatch(f"record seq {previous} is past through_seq {through}")
    return ValidBatch(after, through, seqs, rows, batch.produced_total, batch.evicted_total)


def _record_problem(record: results_pb2.ResultRecord, limits: IngestLimits, max_created: int) -> str:
    if record.kind not in _KNOWN_KINDS:
        return f"kind {record.kind} is not a known RecordKind (1..{max(_KNOWN_KINDS)})"
    if not 0 <= record.created_at_ms <= max_created:
        skew = limits.max_future_skew_ms
        return f"created_at_ms {record.created_at_ms} is before the epoch or more than {skew} ms ahead of the cloud"
    problem = _string_problem(record, limits)
    if problem is None:
        raise AssertionError("a record was refused without a reason")  # pragma: no cover
    return problem


def _string_problem(record: results_pb2.ResultRecord, limits: IngestLimits) -> str | None:
    for name, limit in (
        ("model", limits.max_model_chars),
        ("payload_type", limits.max_payload_type_chars),
        ("request_id", limits.max_request_id_chars),
    ):
        value = getattr(record, name)
        if len(value) > limit:
            return f"{name} is {len(value)} characters: the limit is {limit}"
        if "\0" in value:
            return f"{name} contains a NUL character (PostgreSQL text cannot hold one)"
    return None


class Placement(enum.Enum):
    """Where a batch lies against the device's watermark (the cloud's acked_seq)."""

    # after_seq <= watermark < through_seq: it continues (or overlaps) what the cloud has; the watermark moves.
    ADVANCES = "advances"
    # after_seq > watermark: the cloud lacks seqs before it; store its records, leave the watermark.
    GAP = "gap"
    # through_seq <= watermark: everything in it is stored or declared evicted already.
    REPLAY = "replay"


def place(after_seq: int, through_seq: int, watermark: int) -> Placement:
    """Classify a batch covering (after_seq, through_seq] against `watermark`."""
    if through_seq <= watermark:
        return Placement.REPLAY
    if after_seq > watermark:
        return Placement.GAP
    return Placement.ADVANCES


def missing_ranges(after_seq: int, through_seq: int, present: Sequence[int]) -> list[tuple[int, int]]:
    """The inclusive ranges of seqs in (after_seq, through_seq] absent from `present` (sorted, unique, in range)."""
    if len(present) == through_seq - after_seq:
        return []  # the usual batch: nothing evicted
    ranges: list[tuple[int, int]] = []
    expected = after_seq + 1
    for seq in present:
        if seq > expected:
            ranges.append((expected, seq - 1))
        expected = seq + 1
    if expected <= through_seq:
        ranges.append((expected, through_seq))
    return ranges
