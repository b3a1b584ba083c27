"""What callers hand the writer thread: a bounded list of appends and a list of control operations.

One lock (inside a Condition) guards both. The caller's side is a few attribute operations and a list
append; it wakes the writer only when the writer asked to be woken at that queue length, so a busy
writer costs appenders nothing.
"""

from __future__ import annotations

import sys
import threading
from concurrent.futures import Future
from dataclasses import dataclass
from typing import TypeAlias

from edge_runtime.errors import InvalidInput, Overloaded, RequestTooLarge, ShuttingDown
from edge_runtime.outbox._types import DeferredPayload, OutboxRecord, QuarantineEntry

__all__ = ["Ack", "AppendQueue", "Control", "Flush", "Item", "MarkInDoubt", "Quarantine", "SetLimits"]

_NEVER = sys.maxsize

# An append: the record, its future, the payload bytes it holds against max_pending_bytes (a deferred
# payload's declared size until the writer encodes it).
Item = tuple[OutboxRecord, "Future[int]", int]


@dataclass(frozen=True)
class Ack:
    seq: int
    rejected: frozenset[int]  # seqs up to `seq` the cloud counts as rejected, not stored
    future: Future[int]


@dataclass(frozen=True)
class Quarantine:
    entries: tuple[QuarantineEntry, ...]
    future: Future[int]


@dataclass(frozen=True)
class MarkInDoubt:
    through_seq: int
    after_seq: int | None
    future: Future[int]


@dataclass(frozen=True)
class SetLimits:
    max_bytes: int
    max_age_s: float
    future: Future[None]


@dataclass(frozen=True)
class Flush:
    ticket: int  # resolved once this many appends were taken (and the iteration that took them ended)
    future: Future[None]


Control: TypeAlias = Ack | MarkInDoubt | Quarantine | SetLimits | Flush


class AppendQueue:
    def __init__(
        self,
        *,
        max_pending: int,
        max_pending_bytes: int,
        max_group: int,
        commit_interval_s: float,
        max_record_bytes: int,
    ) -> None:
        self.max_pending = max_pending
        self.max_pending_bytes = max_pending_bytes
        self.max_record_bytes = max_record_bytes
        self.max_group = max_group
        self.commit_interval_s = commit_interval_s
        self._cond = threading.Condition(threading.Lock())
        self._appends: list[Item] = []
        self._controls: list[Control] = []
        self._pending_bytes = 0
        self._enqueued = 0
        self._wake_at = _NEVER  # queue length at which an append wakes the writer
        self._closing = False
        self.refused_total = 0

    @property
    def pending(self) -> int:
        return len(self._appends)

    def put(self, record: OutboxRecord) -> Future[int]:
        payload = record.payload
        if type(payload) is bytes:
            size = len(payload)
        elif type(payload) is DeferredPayload and type(payload.size) is int and payload.size >= 0:
            size = payload.size
        else:
            raise InvalidInput(
                "outbox record refused: its payload must be bytes or a DeferredPayload(encode, size), "
                f"not {type(payload).__name__} (the queue bounds the bytes it holds, so a deferred payload "
                "says how many)"
            )
        if size > self.max_record_bytes:
            raise RequestTooLarge(
                f"outbox record refused: its payload of {size} bytes is past the limit of {self.max_record_bytes} "
                "bytes per record that cloud-sync accepts"
            )
        future: Future[int] = Future()
        with self._cond:
            if self._closing:
                raise ShuttingDown("the outbox is closed and takes no new records")
            n = len(self._appends)
            if n >= self.max_pending or (n and self._pending_bytes + size > self.max_pending_bytes):
                self.refused_total += 1
                raise Overloaded(
                    f"outbox append queue is full ({n} records, {self._pending_bytes} payload bytes waiting; "
                    f"limits {self.max_pending} records, {self.max_pending_bytes} bytes): the disk is not keeping up"
                )
            self._appends.append((record, future, size))
            self._pending_bytes += size
            self._enqueued += 1
            if n >= self._wake_at - 1:
                self._wake_at = _NEVER
                self._cond.notify()
        return future

    def put_control(self, control: Control) -> None:
        with self._cond:
            if self._closing:
                raise ShuttingDown("the outbox is closed")
            self._controls.append(control)
            self._cond.notify()

    def flush_ticket(self) -> int:
        with self._cond:
            return self._enqueued

    def close(self) -> None:
        with self._cond:
            self._closing = True
            self._cond.notify()

    def release(self, payload_bytes: int) -> None:
        """The writer took appends holding this many payload bytes."""
        with self._cond:
            self._pending_bytes -= payload_bytes

    def take(self, idle_timeout: float) -> tuple[list[Item], list[Control], bool]:
        """Wait for work, gather a group for up to commit_interval_s, return (appends, controls, finished).

        finished: the outbox is closing and nothing is left after this batch of work.
        """
        with self._cond:
            if not (self._appends or self._controls or self._closing):
                self._wake_at = 1
                self._cond.wait(idle_timeout)
            n = len(self._appends)
            if 0 < n < self.max_group and self.commit_interval_s > 0 and not self._closing:
                self._wake_at = self.max_group
                self._cond.wait(self.commit_interval_s)
            self._wake_at = _NEVER
            group = self._appends[: self.max_group]
            del self._appends[: self.max_group]
            controls, self._controls = self._controls, []
            finished = self._closing and not self._appends
            return group, controls, finished
