"""Reading the outbox for upload, on the caller's thread, through a read-only connection per thread."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

from edge_runtime.errors import InvalidInput, ShuttingDown
from edge_runtime.outbox._policy import ROW_OVERHEAD_BYTES
from edge_runtime.outbox._schema import connect_reader, read_counters
from edge_runtime.outbox._types import UploadBatch
from edgefleet.proto.edgefleet.v1.results_pb2 import ResultBatch

__all__ = ["Reader"]

_BATCH = (
    "SELECT seq, created_at_ms, model, version, priority, kind, payload_type, payload, request_id "
    "FROM records WHERE seq > ? AND seq <= ? ORDER BY seq LIMIT ?"
)


class Reader:
    def __init__(self, path: Path) -> None:
        self._path = path
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
        taken even past max_bytes, or a large record would block the upload forever.
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
            message = ResultBatch(after_seq=after, produced_total=c["produced_total"], evicted_total=c["evicted_total"])
            add = message.records.add
            through = limit
            total = 0
            for taken, (seq, created, model, version, priority, kind, payload_type, payload, request_id) in enumerate(
                conn.execute(_BATCH, (after, limit, max_records + 1))
            ):
                size = len(payload) + len(model) + len(payload_type) + len(request_id) + ROW_OVERHEAD_BYTES
                if taken == max_records or (taken and total + size > max_bytes):
                    through = message.records[-1].seq
                    break
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
                )
                total += size
        finally:
            conn.execute("COMMIT")
        message.through_seq = through
        return UploadBatch(message)
