"""The outbox's plain data: what callers append, what they read for upload, and the counters they report."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple, TypeAlias

from edge_runtime.errors import OutboxUnusable
from edgefleet.proto.edgefleet.v1.results_pb2 import ResultBatch, ResultRecord

__all__ = [
    "DeferredPayload",
    "OutboxCounters",
    "OutboxRecord",
    "OutboxUnusable",
    "Payload",
    "QuarantineEntry",
    "UploadBatch",
]


class DeferredPayload(NamedTuple):
    """A payload the writer thread encodes (off the caller's thread), with the bytes it holds until then.

    `size` is counted against the append queue's byte bound while the record waits, so it must be what the
    closure keeps alive (e.g. the nbytes of the arrays it references), not 0. The encoded payload's exact
    size is checked again by the writer against the per-record limit.
    """

    encode: Callable[[], bytes]
    size: int


# bytes, or a DeferredPayload: a bare callable is refused, as its size would be unknown to the queue's bound.
Payload: TypeAlias = bytes | DeferredPayload


class OutboxRecord(NamedTuple):
    """One record to keep. A NamedTuple, not a dataclass: it is built on the inference hot path."""

    created_at_ms: int  # wall-clock ms since the epoch, when the result was produced
    model: str
    version: int
    priority: int  # higher survives eviction longer (0 .. 2**32-1)
    kind: int  # a results_pb2.RecordKind value
    payload_type: str  # full protobuf type name of the payload, e.g. "inference.ModelInferResponse"
    payload: Payload
    request_id: str = ""


@dataclass(frozen=True)
class OutboxCounters:
    """A snapshot for telemetry and metrics; reading it costs an attribute load.

    The ledger: produced_total = depth + quarantined + delivered_total + evicted_total + rejected_total.
    """

    depth: int  # records held
    bytes: int  # their accounted size (payload + strings + a fixed per-row overhead)
    produced_total: int  # records ever committed (persisted)
    evicted_total: int  # records dropped before the cloud acknowledged them (persisted)
    delivered_total: int  # records deleted because the cloud acknowledged them as stored (persisted)
    rejected_total: int  # records the cloud acknowledged as rejected (quarantined there or here) (persisted)
    quarantined: int  # records quarantined here whose rejection the cloud has not acknowledged yet (persisted)
    acked_seq: int
    last_seq: int
    in_doubt_seq: int
    oldest_created_at_ms: int | None
    pending: int  # appends queued, not committed yet
    refused_total: int  # appends refused with Overloaded because the queue was full (this process)
    failed_total: int  # appends that failed to commit: disk full, I/O errors (this process)
    recoveries_total: int  # times a damaged file was moved aside and salvaged (persisted)


class QuarantineEntry(NamedTuple):
    """A record found unfit to upload (checksum mismatch, unreadable, past the per-record limit)."""

    seq: int
    reason: str
    fields: str  # its other fields as read, for the operator (bounded)
    payload_head: bytes  # the first bytes of its payload, for the operator (bounded)
    payload_size: int


@dataclass(frozen=True)
class UploadBatch:
    """Records (after_seq, through_seq] for upload: a seq in that range absent from `records` and from
    `message.rejected` was evicted.

    `message` is the ready-to-send ResultBatch (records already in protobuf form: building them costs
    about 2 us a record, as much as a separate list would, and saves a copy). `unfit` lists records the
    read found unfit to send; a batch with any must not be sent before they are quarantined (the Outbox's
    read methods do that and read again).
    """

    message: ResultBatch
    unfit: tuple[QuarantineEntry, ...] = ()

    @property
    def after_seq(self) -> int:
        return self.message.after_seq

    @property
    def through_seq(self) -> int:
        return self.message.through_seq

    @property
    def records(self) -> Sequence[ResultRecord]:
        return self.message.records

    @property
    def rejected_seqs(self) -> list[int]:
        """Seqs of the range quarantined on this device, declared to the cloud as rejected."""
        return [r.seq for r in self.message.rejected]

    @property
    def produced_total(self) -> int:
        return self.message.produced_total

    @property
    def evicted_total(self) -> int:
        return self.message.evicted_total

    @property
    def empty(self) -> bool:
        """Nothing to send: no records and no evictions or rejections to declare."""
        return self.message.through_seq <= self.message.after_seq
