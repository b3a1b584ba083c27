"""Reading the outbox for upload, on the caller's thread, through a read-only connection per thread.

Every record read is checked against the checksum the writer gave it: one that fails (a damaged page, a
flipped bit) or that the cloud could never accept is left out of the batch and reported as unfit, for the
Outbox to quarantine before anything is sent, so a damaged record never reaches the cloud as a valid one.
"""

from __future__ import annotations

import contextlib
import sqlite3
import threading
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from edge_runtime.errors import InvalidInput, ShuttingDown
from edge_runtime.outbox._policy import ROW_OVERHEAD_BYTES
from edge_runtime.outbox._record import CHECKSUM_HEADER, JOIN_BELOW, MAX_RECORD_PAYLOAD_BYTES, record_checksum
from edge_runtime.outbox._schema import connect_reader, read_counters
from edge_runtime.outbox._types import QuarantineEntry, UploadBatch
from edgefleet.proto.edgefleet.v1 import results_pb2
from edgefleet.proto.edgefleet.v1.results_pb2 import ResultBatch

__all__ = ["Reader"]

_BATCH = (
    "SELECT seq, created_at_ms, model, version, priority, kind, payload_type, payload, request_id, checksum "
    "FROM records WHERE seq > ? AND seq <= ? ORDER BY seq LIMIT ?"
)
_QUARANTINED = "SELECT seq, reason FROM quarantine WHERE seq > ? AND seq <= ? ORDER BY seq"
# What a quarantine entry keeps of the record, for the operator.
PAYLOAD_HEAD_BYTES = 4096
_FIELDS_CHARS = 1000
_MAX_REASON_CHARS = 256  # what the cloud keeps of a declared reason
_TEXT_COLUMNS = (2, 6, 8)  # model, payload_type, request_id in a _BATCH row
_UNSEEN = object()


class Reader:
    def __init__(self, path: Path, *, max_record_bytes: int = MAX_RECORD_PAYLOAD_BYTES) -> None:
        self._path = path
        self._max_record_bytes = max_record_bytes
        self._local = threading.local()
        self._lock = threading.Lock()
        self._connections: list[sqlite3.Connection] = []
        self._closed = False

    def connection(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            with self._lock:
                if self._closed:
                    raise ShuttingDown("the outbox is closed")
                conn = connect_reader(self._path)
                self._connections.append(conn)
            self._local.conn = conn
        return conn

    def close(self) -> None:
        with self._lock:
            self._closed = True
            connections, self._connections = self._connections, []
        for conn in connections:
            conn.close()

    def read_batch(
        self, max_records: int, max_bytes: int, *, after_seq: int | None = None, through_limit: int | None = None
    ) -> UploadBatch:
        """Records after `after_seq` (default: acked_seq) in seq order, cut at max_records or max_bytes.

        through_seq is the last record's seq when the batch was cut, else the last seq committed (or
        through_limit), so evictions at the end of the range are declared too. At least one record is
        taken even past max_bytes, or a large record would block the upload forever. Records quarantined
        in the range are declared in `message.rejected`; records found unfit now are in `unfit`.
        """
        if max_records < 1 or max_bytes < 1:
            raise InvalidInput(f"read_batch needs max_records >= 1 and max_bytes >= 1, got {max_records}, {max_bytes}")
        if self._closed:
            raise ShuttingDown("the outbox is closed")
        conn = self.connection()
        conn.execute("BEGIN")  # one snapshot for the counters and the records
        try:
            c = read_counters(conn)
            after = c["acked_seq"] if after_seq is None else max(after_seq, c["acked_seq"])
            if after > c["last_seq"]:
                raise InvalidInput(f"read_batch after seq {after_seq}: the outbox's last seq is {c['last_seq']}")
            limit = c["last_seq"] if through_limit is None else min(through_limit, c["last_seq"])
            message = ResultBatch(
                after_seq=after,
                produced_total=c["produced_total"],
                evicted_total=c["evicted_total"],
                # Quarantined here but not acknowledged yet: declared now, so counted too.
                rejected_total=c["rejected_total"] + c["quarantined"],
                record_checksum=results_pb2.RECORD_CHECKSUM_CRC32,
            )
            args = (after, limit, max_records + 1)
            try:
                through, unfit = self._fill(message, conn.execute(_BATCH, args), limit, max_records, max_bytes)
            except sqlite3.OperationalError as exc:
                if "decode" not in str(exc):
                    raise
                # A TEXT value that is not UTF-8 (a damaged page): read the range as bytes, judge each row.
                del message.records[:]
                through, unfit = self._fill(message, _raw_rows(conn, args), limit, max_records, max_bytes)
            message.through_seq = through
            if c["quarantined"]:
                for seq, reason in conn.execute(_QUARANTINED, (after, through)):
                    message.rejected.add(seq=seq, reason=str(reason)[:_MAX_REASON_CHARS])
        finally:
            conn.execute("COMMIT")
        return UploadBatch(message, tuple(unfit))

    def _fill(
        self, message: ResultBatch, rows: Iterable[Any], limit: int, max_records: int, max_bytes: int
    ) -> tuple[int, list[QuarantineEntry]]:
        """Add the rows that verify to `message`; returns (through_seq, the unfit rows)."""
        add = message.records.add
        through = limit
        total = 0
        last = 0  # the last seq taken, as a record or as unfit
        unfit: list[QuarantineEntry] = []
        max_payload = self._max_record_bytes
        pack, crc32 = CHECKSUM_HEADER.pack, zlib.crc32
        seen_model: object = _UNSEEN
        seen_type: object = _UNSEEN
        strings_b = b""
        model_len = type_len = 0
        for taken, row in enumerate(rows):
            seq, created, model, version, priority, kind, payload_type, payload, request_id, check = row
            try:
                size = len(payload) + len(model) + len(payload_type) + len(request_id) + ROW_OVERHEAD_BYTES
                if taken == max_records or (taken and total + size > max_bytes):
                    through = last
                    break
                if model != seen_model or payload_type != seen_type:
                    model_b, type_b = model.encode(), payload_type.encode()
                    strings_b, model_len, type_len = model_b + type_b, len(model_b), len(type_b)
                    seen_model, seen_type = model, payload_type
                request_b = request_id.encode()
                header = pack(seq, created, version, priority, kind, model_len, type_len, len(request_b))
                fields = header + strings_b + request_b
                payload_size = len(payload)
                # One crc32 over a joined copy is cheaper than chaining two, for all but large payloads.
                fit = payload_size <= max_payload and check == (
                    crc32(fields + payload) if payload_size < JOIN_BELOW else crc32(payload, crc32(fields))
                )
            except Exception:  # a damaged row: a value of the wrong type
                fit = False
            last = seq
            if fit:
                try:
                    add(
                        seq=seq,
                        created_at_ms=created,
                        model=model,
                        version=version,
                        priority=priority,
                        kind=kind,
                        payload_type=payload_type,
                        payload=payload,
                        request_id=request_id,
                        checksum=check,
                    )
                    total += size
                    continue
                except Exception:  # a value a ResultRecord cannot hold
                    if message.records and message.records[-1].seq == seq:
                        del message.records[-1]
            unfit.append(quarantine_entry(row, self._max_record_bytes))
        return through, unfit


def _raw_rows(conn: sqlite3.Connection, args: tuple[int, int, int]) -> Iterator[tuple[Any, ...]]:
    """The rows of _BATCH with text read as bytes and decoded where it is UTF-8 (left as bytes where not)."""
    conn.text_factory = bytes
    try:
        for row in conn.execute(_BATCH, args).fetchall():
            values = list(row)
            for i in _TEXT_COLUMNS:
                if isinstance(values[i], bytes):
                    with contextlib.suppress(UnicodeDecodeError):
                        values[i] = values[i].decode()
            yield tuple(values)
    finally:
        conn.text_factory = str


def quarantine_entry(row: tuple[Any, ...], max_record_bytes: int) -> QuarantineEntry:
    """What the quarantine keeps of an unfit `_BATCH` row, and why it is unfit."""
    seq, created, model, version, priority, kind, payload_type, payload, request_id, check = row
    fields = repr(
        {
            "created_at_ms": created,
            "model": model,
            "version": version,
            "priority": priority,
            "kind": kind,
            "payload_type": payload_type,
            "request_id": request_id,
            "checksum": check,
        }
    )[:_FIELDS_CHARS]
    raw = payload if isinstance(payload, bytes) else str(payload).encode(errors="replace")
    return QuarantineEntry(int(seq), unfit_reason(row, max_record_bytes), fields, raw[:PAYLOAD_HEAD_BYTES], len(raw))


def unfit_reason(row: tuple[Any, ...], max_record_bytes: int) -> str:
    """Why a `_BATCH` row cannot be uploaded as it is."""
    seq, created, model, version, priority, kind, payload_type, payload, request_id, check = row
    for name, value in (("model", model), ("payload_type", payload_type), ("request_id", request_id)):
        if isinstance(value, bytes):
            return f"{name} is not valid UTF-8 text: the outbox file was damaged"
    expected = {
        "created_at_ms": (created, int),
        "model": (model, str),
        "version": (version, int),
        "priority": (priority, int),
        "kind": (kind, int),
        "payload_type": (payload_type, str),
        "payload": (payload, bytes),
        "request_id": (request_id, str),
        "checksum": (check, int),
    }
    for name, (value, kind_of) in expected.items():
        if type(value) is not kind_of:
            return f"{name} is {type(value).__name__}, not {kind_of.__name__}: the outbox file was damaged"
    if len(payload) > max_record_bytes:
        return (
            f"its payload of {len(payload)} bytes is past the limit of {max_record_bytes} bytes per record that "
            "cloud-sync accepts"
        )
    try:
        computed = record_checksum(seq, created, model, version, priority, kind, payload_type, payload, request_id)
    except Exception as exc:
        return f"its fields cannot be uploaded ({exc})"
    if computed != check:
        return (
            f"its checksum does not match its contents (stored {check}, computed {computed}): "
            "the outbox file was damaged"
        )
    return "its fields cannot be held by a ResultRecord"
