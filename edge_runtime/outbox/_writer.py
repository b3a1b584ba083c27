"""The outbox's one writer thread: group commit of appends, then acks, in-doubt marks and eviction.

Each iteration runs the control operations (acks free space first; quarantines), checks, encodes and
checksums the group of appends and commits it in one transaction with the counters, resolves their futures,
evicts, and only then resolves the control operations' futures, so a caller of ack, set_limits or flush sees
their effects done.
"""

from __future__ import annotations

import contextlib
import dataclasses
import sqlite3
import threading
import zlib
from collections.abc import Sequence
from concurrent.futures import Future, InvalidStateError
from typing import Any

import structlog

from edge_runtime.errors import InvalidInput, RequestTooLarge
from edge_runtime.outbox._policy import ROW_OVERHEAD_BYTES, storage_failure
from edge_runtime.outbox._queue import Ack, AppendQueue, Control, Flush, Item, MarkInDoubt, Quarantine, SetLimits
from edge_runtime.outbox._record import CHECKSUM_HEADER, JOIN_BELOW, fields_ok, record_problem, strings_problem
from edge_runtime.outbox._store import RecordStore, now_ms
from edge_runtime.outbox._types import DeferredPayload, OutboxCounters

__all__ = ["Writer"]

log = structlog.get_logger(__name__)

_MAX_IDLE_S = 60.0
_I64_MAX = 2**63 - 1
_UNSEEN = object()


class Writer:
    def __init__(
        self, conn: sqlite3.Connection, path: str, queue: AppendQueue, *, max_bytes: int, max_age_s: float
    ) -> None:
        self._store = RecordStore(conn)
        self._path = path
        self._queue = queue
        self._max_bytes = max_bytes
        self._max_age_ms = int(max_age_s * 1000)
        self._taken = 0  # appends taken off the queue, for flush tickets
        self._failed_total = 0
        self._failing = False
        self._flushes: list[Flush] = []
        self.snapshot = self._snapshot()
        # daemon: a process that exits without close() loses only uncommitted appends, as on kill -9
        # (whose futures never resolved); a stuck disk must not keep the process from exiting.
        self._thread = threading.Thread(target=self._run, name="outbox-writer", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def join(self, timeout: float | None) -> bool:
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def alive(self) -> bool:
        return self._thread.is_alive()

    def counters(self) -> OutboxCounters:
        return dataclasses.replace(self.snapshot, pending=self._queue.pending, refused_total=self._queue.refused_total)

    def _run(self) -> None:
        try:
            finished = False
            while not finished:
                group, controls, finished = self._queue.take(self._idle_timeout())
                try:
                    self._iteration(group, controls)
                except Exception as exc:  # a bug; the writer must outlive it, and no future may hang
                    log.exception("outbox.writer_error")
                    _fail_all([f for _, f, _ in group] + [c.future for c in controls], exc)
        finally:
            for flush in self._flushes:
                _resolve(flush.future, None)
            self._store.close()

    def _iteration(self, group: list[Item], controls: list[Control]) -> None:
        outcomes: list[tuple[Future[Any], Any, Exception | None]] = []
        for control in controls:
            if isinstance(control, Flush):
                self._flushes.append(control)
                continue
            try:
                outcomes.append((control.future, self._control(control), None))
            except Exception as exc:
                outcomes.append((control.future, None, exc))
        if group:
            self._taken += len(group)
            self._commit(group)
        try:
            self._store.evict(self._max_bytes, self._max_age_ms)
        except Exception as exc:  # retried after the next commit
            log.error("outbox.evict_failed", error=str(exc))
        self.snapshot = self._snapshot()
        for future, value, error in outcomes:
            if future.set_running_or_notify_cancel():
                if error is None:
                    future.set_result(value)
                else:
                    future.set_exception(error)
        done = [flush for flush in self._flushes if self._taken >= flush.ticket]
        self._flushes = [flush for flush in self._flushes if self._taken < flush.ticket]
        for flush in done:
            _resolve(flush.future, None)

    def _control(self, control: Ack | MarkInDoubt | Quarantine | SetLimits) -> Any:
        if isinstance(control, Ack):
            return self._store.ack(control.seq, control.rejected)
        if isinstance(control, MarkInDoubt):
            return self._store.mark_in_doubt(control.through_seq, control.after_seq)
        if isinstance(control, Quarantine):
            return self._store.quarantine(control.entries)
        self._max_bytes = control.max_bytes
        self._max_age_ms = int(control.max_age_s * 1000)
        return None

    def _idle_timeout(self) -> float:
        """Until the oldest evictable record expires (age eviction runs then), at most a minute."""
        hint = self._store.age_hint
        if not self._max_age_ms or hint is None:
            return _MAX_IDLE_S
        return min(_MAX_IDLE_S, max(0.05, (hint + self._max_age_ms - now_ms()) / 1000))

    def _commit(self, group: list[Item]) -> None:
        params, futures, added, oldest = self._prepare(group, self._store.counters["last_seq"])
        if not futures:
            return
        try:
            first = self._store.insert(params, added, oldest)
        except Exception as exc:
            self._failed_total += len(futures)
            if not self._failing:
                self._failing = True
                log.error("outbox.write_failed", error=str(exc), records=len(futures), path=self._path)
            for future in futures:
                _settle(future, error=storage_failure(exc, self._path, len(futures)))
            return
        if self._failing:
            self._failing = False
            log.info("outbox.write_recovered", failed_total=self._failed_total)
        for seq, future in enumerate(futures, first):
            # Not contextlib.suppress: a context manager per record costs more than the rest of this loop.
            try:  # noqa: SIM105
                future.set_result(seq)
            except InvalidStateError:  # cancelled by its caller; cancelling does not withdraw a record
                pass

    def _prepare(self, group: list[Item], last_seq: int) -> tuple[list[Any], list[Future[int]], int, int]:
        """Check, encode and checksum a group: (flat row parameters, futures of rows, their bytes, oldest
        created_at). The hot loop of append: each field read once, strings that repeat checked once."""
        params: list[Any] = []
        futures: list[Future[int]] = []
        added = released = 0
        oldest = _I64_MAX
        seq = last_seq
        max_payload = self._queue.max_record_bytes
        # _record.checksum, inlined: a call per record costs what the checksum itself does.
        pack, crc32 = CHECKSUM_HEADER.pack, zlib.crc32
        # Records of a group nearly always share model and payload_type: check and encode those once.
        seen_model: object = _UNSEEN
        seen_type: object = _UNSEEN
        strings_b = b""
        model_len = type_len = fixed = 0
        for record, future, counted in group:
            released += counted
            created, model, version, priority, kind, payload_type, payload, request_id = record
            if (
                type(model) is not str
                or type(payload_type) is not str
                or model != seen_model
                or payload_type != seen_type
            ):
                problem = strings_problem(model, payload_type)
                if problem is not None:
                    _settle(future, error=InvalidInput(f"outbox record refused: {problem}"))
                    continue
                seen_model, seen_type = model, payload_type
                model_b, type_b = model.encode(), payload_type.encode()
                strings_b, model_len, type_len = model_b + type_b, len(model_b), len(type_b)
                fixed = len(model) + len(payload_type) + ROW_OVERHEAD_BYTES
            if not fields_ok(created, version, priority, kind, request_id):
                problem = record_problem(created, model, version, priority, kind, payload_type, request_id)
                _settle(future, error=InvalidInput(f"outbox record refused: {problem}"))
                continue
            try:
                request_b = request_id.encode()
            except UnicodeEncodeError:  # SQLite would refuse it too, and fail the whole group with it
                _settle(future, error=InvalidInput("outbox record refused: request_id holds a lone surrogate"))
                continue
            if type(payload) is not bytes:
                try:
                    payload = _encode(payload)
                except Exception as exc:  # the caller's encoder failed: its own error, on its own future
                    _settle(future, error=exc)
                    continue
            size = len(payload)
            if size > max_payload:  # a deferred payload's declared size was an estimate; this is exact
                _settle(future, error=_too_large(size, max_payload))
                continue
            seq += 1
            header = pack(seq, created, version, priority, kind, model_len, type_len, len(request_b))
            # One crc32 over a joined copy is cheaper than chaining two, for all but large payloads.
            check = (
                crc32(header + strings_b + request_b + payload)
                if size < JOIN_BELOW
                else crc32(payload, crc32(header + strings_b + request_b))
            )
            params += (seq, created, model, version, priority, kind, payload_type, payload, request_id, size, check)
            futures.append(future)
            added += size + fixed + len(request_id)
            if created < oldest:
                oldest = created
        self._queue.release(released)
        return params, futures, added, oldest

    def _snapshot(self) -> OutboxCounters:
        c = self._store.counters
        return OutboxCounters(
            depth=c["depth"],
            bytes=c["bytes"],
            produced_total=c["produced_total"],
            evicted_total=c["evicted_total"],
            delivered_total=c["delivered_total"],
            rejected_total=c["rejected_total"],
            quarantined=c["quarantined"],
            acked_seq=c["acked_seq"],
            last_seq=c["last_seq"],
            in_doubt_seq=c["in_doubt_seq"],
            oldest_created_at_ms=self._store.oldest,
            pending=0,
            refused_total=0,
            failed_total=self._failed_total,
            recoveries_total=c["recoveries_total"],
        )


def _encode(payload: object) -> bytes:
    if type(payload) is DeferredPayload:
        payload = payload.encode()
    if isinstance(payload, (bytes, bytearray, memoryview)):
        return bytes(payload)
    raise InvalidInput(f"outbox record refused: payload must be bytes or return bytes, got {type(payload).__name__}")


def _too_large(size: int, limit: int) -> RequestTooLarge:
    return RequestTooLarge(
        f"outbox record refused: its payload of {size} bytes is past the limit of {limit} bytes per record "
        "that cloud-sync accepts"
    )


def _settle(future: Future[Any], *, error: BaseException) -> None:
    with contextlib.suppress(InvalidStateError):  # cancelled by its caller
        future.set_exception(error)


def _resolve(future: Future[None], value: None) -> None:
    if future.set_running_or_notify_cancel():
        future.set_result(value)


def _fail_all(futures: Sequence[Future[Any]], exc: Exception) -> None:
    for future in futures:
        if not future.done():
            with contextlib.suppress(Exception):  # resolved or cancelled meanwhile
                future.set_exception(exc)
