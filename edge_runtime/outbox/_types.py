"""The outbox's plain data: what callers append, what they read for upload, and the counters they report."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple, TypeAlias

from edge_runtime.errors import OutboxUnusable
from edgefleet.proto.edgefleet.v1.results_pb2 import ResultBatch, ResultRecord

__all__ = ["OutboxCounters", "OutboxRecord", "OutboxUnusable", "Payload", "UploadBatch"]

# bytes, or a zero-argument callable the writer thread calls to encode them (off the caller's thread).
Payload: TypeAlias = bytes | Callable[[], bytes]


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
    """A snapshot for telemetry and metrics; reading it costs an attribute load."""

    depth: int  # records held
    bytes: int  # their accounted size (payload + strings + a fixed per-row overhead)
    produced_total: int  # records ever committed (persisted)
    evicted_total: int  # records dropped before the cloud acknowledged them (persisted)
    delivered_total: int  # records deleted because the cloud acknowledged them (persisted)
    acked_seq: int
    last_seq: int
    in_doubt_seq: int
    oldest_created_at_ms: int | None
    pending: int  # appends queued, not committed yet
    rejected_total: int  # appends refused with Overloaded because the queue was full (this process)
    failed_total: int  # appends that failed to commit: disk full, I/O errors (this process)
    recoveries_total: int  # times a damaged file was moved aside and salvaged (persisted)


@dataclass(frozen=True)
class UploadBatch:
    """Records (after_seq, through_seq] for upload: a seq in that range absent from `records` was evicted.

    `message` is the ready-to-send ResultBatch (records already in protobuf form: building them costs
    about 2 us a record, as much as a separate list would, and saves a copy).
    """

    message: ResultBatch

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
    def produced_total(self) -> int:
        return self.message.produced_total

    @property
    def evicted_total(self) -> int:
        return self.message.evicted_total

    @property
    def empty(self) -> bool:
        """Nothing to send: no records and no evictions to declare."""
        return self.message.through_seq <= self.message.after_seq
