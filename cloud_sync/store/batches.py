"""The upload protocol's rules for one batch, as plain functions: validate a ResultBatch and sort its records
into those to store and those to quarantine. Where it lies against the device's watermark and the ledger it
implies are ledger.py's; results.py applies both in a transaction. No I/O here.

Two kinds of problem, two answers. A batch that breaks the protocol (seqs out of order, a range or counters
that contradict each other) is refused whole with InvalidBatch: nothing changes. A record the cloud can never
accept (unknown kind, a string past its limit or holding NUL, a payload past the per-record limit, a checksum
that does not match) is quarantined, counted as rejected, and the watermark moves past it: no content of one
record can wedge a device's stream. A record's timestamp is never a reason: a device's clock may be wrong.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from cloud_sync.errors import InvalidBatch
from edgefleet.proto.edgefleet.v1 import results_pb2
from edgefleet.records import (
    CHECKSUM_HEADER,
    JOIN_BELOW,
    KNOWN_KINDS,
    MAX_MODEL_CHARS,
    MAX_PAYLOAD_TYPE_CHARS,
    MAX_RECORD_PAYLOAD_BYTES,
    MAX_REQUEST_ID_CHARS,
    checksum_of,
)

__all__ = [
    "MAX_SEQ",
    "ROW_COLUMNS",
    "IngestLimits",
    "QuarantinedRecord",
    "ValidBatch",
    "record_checksum",
    "validate_batch",
]

# Seqs and counters are uint64 on the wire but BIGINT (signed) in the store.
MAX_SEQ = 2**63 - 1

_KNOWN_KINDS = KNOWN_KINDS
_CHECKSUMS = frozenset(results_pb2.RecordChecksum.values())


@dataclass(frozen=True)
class IngestLimits:
    """What one uploaded batch and each of its records may hold.

    A batch past max_records or max_payload_bytes is refused whole (InvalidBatch); a record past a record
    limit is quarantined. The record limits default to the ones the device's outbox enforces at append
    (edgefleet/records.py), so a current device never sends such a record.
    """

    # Records in one batch (the device's upload.batch_max_records must not exceed it); rejections likewise.
    max_records: int = 10_000
    # The payload bytes of one batch, the records it stores together (quarantined ones are not kept whole).
    # The transport's message size limit bounds the batch before it is even parsed; this bounds what is stored.
    max_payload_bytes: int = 32 * 1024 * 1024
    # One record's payload.
    max_record_payload_bytes: int = MAX_RECORD_PAYLOAD_BYTES
    # Characters of ResultRecord.model, .payload_type and .request_id.
    max_model_chars: int = MAX_MODEL_CHARS
    max_payload_type_chars: int = MAX_PAYLOAD_TYPE_CHARS
    max_request_id_chars: int = MAX_REQUEST_ID_CHARS
    # A record stamped further than this ahead of the cloud's clock is counted as clock-skewed (and stored).
    clock_skew_tolerance_ms: int = 5 * 60 * 1000
    # What the quarantine keeps of a record it holds: the first bytes of its serialized form.
    max_quarantined_bytes: int = 64 * 1024
    # Characters kept of a reason a device gives for a rejection.
    max_reason_chars: int = 256


@dataclass(frozen=True)
class QuarantinedRecord:
    """A record the cloud will not store as a result: why, and (for one it received) a bounded copy."""

    seq: int
    reason: str
    # "cloud": it failed here; "device": the device quarantined it and declared it (no bytes then).
    source: str
    record: bytes | None = None
    record_size: int = 0
    created_at_ms: int | None = None


@dataclass(frozen=True)
class ValidBatch:
    """A batch that passed validation: its records to store as rows ready for executemany, and the rest.

    `rows[i]` is a tuple in ROW_COLUMNS order and `seqs[i]` its seq; seqs are strictly increasing, as are
    those of `quarantined` (records of the batch) and `declared` (rejections the device declared). The three
    sets are disjoint. `skewed` maps the seq of each row stamped past the clock tolerance to its skew.
    """

    after_seq: int
    through_seq: int
    seqs: list[int]
    rows: list[tuple[object, ...]]
    device_produced_total: int
    device_evicted_total: int
    device_rejected_total: int = 0
    quarantined: list[QuarantinedRecord] = field(default_factory=list)
    declared: list[QuarantinedRecord] = field(default_factory=list)
    skewed: dict[int, int] = field(default_factory=dict)

    @property
    def received(self) -> int:
        """Records the batch carried."""
        return len(self.seqs) + len(self.quarantined)


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
    "checksum",
)


def record_checksum(record: results_pb2.ResultRecord) -> int:
    """RECORD_CHECKSUM_CRC32 of a record, over the values the store keeps."""
    return checksum_of(record)


def validate_batch(
    device_id: str, batch: results_pb2.ResultBatch, limits: IngestLimits, received_at_ms: int
) -> ValidBatch:
    """Check `batch` against the upload protocol; raise InvalidBatch naming the first protocol problem.

    Records the cloud cannot accept are sorted out into `quarantined`, each with its reason.
    """
    after, through = batch.after_seq, batch.through_seq
    _check_range(batch, limits)
    records = batch.records
    checked = batch.record_checksum == results_pb2.RECORD_CHECKSUM_CRC32

    skew_limit = received_at_ms + limits.clock_skew_tolerance_ms
    max_rid = limits.max_request_id_chars
    max_payload = limits.max_record_payload_bytes
    kinds = _KNOWN_KINDS
    pack, crc32 = CHECKSUM_HEADER.pack, zlib.crc32
    seqs: list[int] = []
    rows: list[tuple[object, ...]] = []
    quarantined: list[QuarantinedRecord] = []
    skewed: dict[int, int] = {}
    add_seq, add_row = seqs.append, rows.append
    previous = after
    payload_bytes = 0
    # Records of a batch nearly always share model and payload_type: check and encode those when they change.
    checked_model = checked_type = None
    strings_b = b""
    model_len = type_len = 0
    check: int | None = None
    # The hot loop of ingest (about 1.3 us a record, half of it the checksum): one pass, each field read once,
    # checks cheap when they pass.
    for index, record in enumerate(records):
        seq = record.seq
        if seq <= previous or seq > through:
            raise InvalidBatch(f"record {index}: {_order_problem(seq, previous, after, through, index)}")
        previous = seq
        created, model, payload_type, request_id, kind, payload, version, priority = (
            record.created_at_ms,
            record.model,
            record.payload_type,
            record.request_id,
            record.kind,
            record.payload,
            record.version,
            record.priority,
        )
        if model != checked_model or payload_type != checked_type:
            problem = _string_problem(record, limits)
            if problem:
                quarantined.append(_quarantine(record, problem, limits))
                continue
            checked_model, checked_type = model, payload_type
            model_b, type_b = model.encode(), payload_type.encode()
            strings_b, model_len, type_len = model_b + type_b, len(model_b), len(type_b)
        size = len(payload)
        if checked:
            request_b = request_id.encode()
            header = pack(seq, created, version, priority, kind, model_len, type_len, len(request_b))
            # One crc32 over a joined copy is cheaper than chaining two, for all but large payloads.
            check = (
                crc32(header + strings_b + request_b + payload)
                if size < JOIN_BELOW
                else crc32(payload, crc32(header + strings_b + request_b))
            )
        if (
            kind not in kinds
            or len(request_id) > max_rid
            or "\0" in request_id
            or size > max_payload
            or (checked and check != record.checksum)
        ):
            quarantined.append(_quarantine(record, _record_problem(record, limits, check), limits))
            continue
        if created > skew_limit:
            skewed[seq] = created - received_at_ms
        payload_bytes += size
        add_seq(seq)
        add_row(
            (
                device_id,
                seq,
                created,
                model,
                version,
                priority,
                kind,
                payload_type,
                payload,
                request_id,
                received_at_ms,
                check,
            )
        )
    if payload_bytes > limits.max_payload_bytes:
        raise InvalidBatch(
            f"payloads of the batch total {payload_bytes} bytes: the limit is {limits.max_payload_bytes}"
        )
    declared = _declared_rejections(batch, limits)
    if declared:
        _check_disjoint(declared, seqs, quarantined)
    valid = ValidBatch(
        after,
        through,
        seqs,
        rows,
        batch.produced_total,
        batch.evicted_total,
        batch.rejected_total,
        quarantined,
        declared,
        skewed,
    )
    _check_declared_counters(valid)
    return valid


def _check_range(batch: results_pb2.ResultBatch, limits: IngestLimits) -> None:
    after, through = batch.after_seq, batch.through_seq
    if through < after:
        raise InvalidBatch(f"through_seq {through} is below after_seq {after}")
    if through > MAX_SEQ:
        raise InvalidBatch(f"through_seq {through} is past the largest seq the store keeps ({MAX_SEQ})")
    for name in ("produced_total", "evicted_total", "rejected_total"):
        if getattr(batch, name) > MAX_SEQ:
            raise InvalidBatch(f"{name} {getattr(batch, name)} is past {MAX_SEQ}")
    if batch.record_checksum not in _CHECKSUMS:
        raise InvalidBatch(f"record_checksum {batch.record_checksum} is not a RecordChecksum this cloud-sync knows")
    if len(batch.records) > limits.max_records:
        raise InvalidBatch(f"{len(batch.records)} records in one batch: the limit is {limits.max_records}")
    if len(batch.rejected) > limits.max_records:
        raise InvalidBatch(f"{len(batch.rejected)} rejections in one batch: the limit is {limits.max_records}")


def _order_problem(seq: int, previous: int, after: int, through: int, index: int) -> str:
    if seq > through and seq > previous:
        return f"seq {seq} is past through_seq {through}"
    where = f"after_seq {after}" if index == 0 else f"the previous record's seq {previous}"
    return f"seq {seq} does not follow {where} (seqs must increase)"


def _declared_rejections(batch: results_pb2.ResultBatch, limits: IngestLimits) -> list[QuarantinedRecord]:
    declared: list[QuarantinedRecord] = []
    previous = batch.after_seq
    for index, rejection in enumerate(batch.rejected):
        seq = rejection.seq
        if seq <= previous or seq > batch.through_seq:
            raise InvalidBatch(
                f"rejection {index}: seq {seq} is not in ({previous}, {batch.through_seq}] (rejections must increase "
                "within the batch's range)"
            )
        previous = seq
        reason = rejection.reason.replace("\0", "?")[: limits.max_reason_chars] or "no reason given"
        declared.append(QuarantinedRecord(seq, f"on the device: {reason}", "device"))
    return declared


def _check_disjoint(
    declared: Sequence[QuarantinedRecord], seqs: Iterable[int], quarantined: Iterable[QuarantinedRecord]
) -> None:
    sent = set(seqs).union(q.seq for q in quarantined)
    both = [d.seq for d in declared if d.seq in sent]
    if both:
        raise InvalidBatch(f"seq {both[0]} is both among the records and declared rejected")


def _check_declared_counters(batch: ValidBatch) -> None:
    """The batch against the device's own counters, with nothing else known: a batch never covers seqs the
    device has not produced, nor declares more evictions or rejections than the device counts."""
    produced, evicted, rejected = batch.device_produced_total, batch.device_evicted_total, batch.device_rejected_total
    if batch.through_seq > produced:
        raise InvalidBatch(
            f"through_seq {batch.through_seq} is past the device's own produced_total {produced}: a batch covers "
            "only seqs the device produced"
        )
    if evicted + rejected > produced:
        raise InvalidBatch(
            f"the device's evicted_total {evicted} and rejected_total {rejected} add up to more than its "
            f"produced_total {produced}"
        )
    missing = batch.through_seq - batch.after_seq - batch.received - len(batch.declared)
    if missing > evicted:
        raise InvalidBatch(
            f"the batch leaves out {missing} seqs of ({batch.after_seq}, {batch.through_seq}] (declared evicted) "
            f"but the device's evicted_total is {evicted}"
        )
    if len(batch.declared) > rejected:
        raise InvalidBatch(
            f"the batch declares {len(batch.declared)} rejections but the device's rejected_total is {rejected}"
        )


def _quarantine(record: results_pb2.ResultRecord, reason: str, limits: IngestLimits) -> QuarantinedRecord:
    raw = record.SerializeToString()
    return QuarantinedRecord(
        record.seq, reason, "cloud", raw[: limits.max_quarantined_bytes], len(raw), record.created_at_ms
    )


def _record_problem(record: results_pb2.ResultRecord, limits: IngestLimits, computed: int | None) -> str:
    if record.kind not in _KNOWN_KINDS:
        return f"kind {record.kind} is not a known RecordKind (1..{max(_KNOWN_KINDS)})"
    if len(record.payload) > limits.max_record_payload_bytes:
        return (
            f"payload of {len(record.payload)} bytes is past the limit of {limits.max_record_payload_bytes} bytes "
            "per record"
        )
    problem = _string_problem(record, limits)
    if problem:
        return problem
    if computed is not None and computed != record.checksum:
        return f"checksum {record.checksum} does not match the record's contents ({computed}): damaged on the way"
    raise AssertionError("a record was quarantined without a reason")  # pragma: no cover


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
