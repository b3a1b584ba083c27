"""Result ingest (exactly-once per (device_id, seq)) and the operators' queries over stored results.

The protocol rules live in batches.py; this module applies them in one transaction per batch. Synchronous by
design: the gRPC servicer calls it from a thread pool, never on the event loop.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import cast

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite

from cloud_sync.errors import DeviceRevoked, InvalidArgument, NotFound
from cloud_sync.store.batches import (
    ROW_COLUMNS,
    IngestLimits,
    Placement,
    ValidBatch,
    missing_ranges,
    place,
    validate_batch,
)
from cloud_sync.store.database import Database, now_ms
from cloud_sync.store.schema import device_uplink, devices, evictions, results
from edgefleet.proto.edgefleet.v1 import results_pb2

__all__ = ["MAX_PAGE", "IngestOutcome", "Reconciliation", "ResultStore", "StoredResult"]

# The most rows one `results()` call returns.
MAX_PAGE = 10_000


@dataclass(frozen=True)
class IngestOutcome:
    """What one ingested batch did; the fields of the UploadAck the device receives."""

    # Every seq up to it is stored or was declared evicted: the device may delete up to it.
    acked_seq: int
    # Records of this batch newly stored, and those the cloud already had (retries, replays).
    stored: int
    duplicates: int
    # Seqs this batch declared evicted that the cloud newly counted.
    evicted: int


@dataclass(frozen=True)
class Reconciliation:
    """One device's upload counters, so an operator can check stored + evicted = produced."""

    stored: int
    evicted: int
    # The device's own counters, as it last reported them.
    device_produced: int
    device_evicted: int
    acked_seq: int
    duplicates_total: int
    # Above acked_seq only while records stored past a gap wait for the seqs before them.
    max_stored_seq: int
    last_upload_at_ms: int | None


@dataclass(frozen=True)
class StoredResult:
    """One stored record; `id` is the store's cursor (increasing in insert order), `seq` the device's."""

    id: int
    device_id: str
    seq: int
    created_at_ms: int
    model: str
    version: int
    priority: int
    kind: int
    payload_type: str
    payload: bytes
    request_id: str
    received_at_ms: int


# Locks the device's uplink row for the rest of the transaction (FOR UPDATE renders to nothing on SQLite, where
# BEGIN IMMEDIATE already made this transaction the only writer).
_LOCK_UPLINK = (
    sa.select(device_uplink, devices.c.revoked_at_ms)
    .join_from(device_uplink, devices, device_uplink.c.device_id == devices.c.device_id)
    .where(device_uplink.c.device_id == sa.bindparam("device_id"))
    .with_for_update(of=device_uplink)
)
_UPDATE_UPLINK = device_uplink.update().where(device_uplink.c.device_id == sa.bindparam("key"))


class ResultStore:
    """Ingest of uploaded batches and the queries over what was stored. Thread-safe."""

    def __init__(self, db: Database, limits: IngestLimits | None = None) -> None:
        self._db = db
        self.limits = limits or IngestLimits()
        self._insert_rows = _executemany_inserter(db.backend)

    def ingest(self, device_id: str, batch: results_pb2.ResultBatch) -> IngestOutcome:
        """Store `batch` for `device_id` exactly once, move the watermark, and commit; then return the ack.

        `device_id` comes from the caller's credential, never from the message. Raises InvalidBatch (nothing
        changed), NotFound (no such device), DeviceRevoked, or StoreUnavailable (retrying is safe: a batch
        stored twice stores nothing the second time). Commits before it returns, so the caller may ack.
        """
        received_at_ms = now_ms()
        valid = validate_batch(device_id, batch, self.limits, received_at_ms)
        return self._db.write(lambda conn: self._apply(conn, device_id, valid, received_at_ms))

    def _apply(self, conn: sa.Connection, device_id: str, batch: ValidBatch, received_at_ms: int) -> IngestOutcome:
        uplink = conn.execute(_LOCK_UPLINK, {"device_id": device_id}).one_or_none()
        if uplink is None:
            raise NotFound(f"no device {device_id!r} is registered")
        if uplink.revoked_at_ms is not None:
            raise DeviceRevoked(f"device {device_id!r} was revoked; its uploads are refused")
        watermark = uplink.acked_seq
        received = len(batch.seqs)
        placement = place(batch.after_seq, batch.through_seq, watermark)
        if placement is Placement.REPLAY:
            conn.execute(
                _UPDATE_UPLINK,
                {
                    "key": device_id,
                    "duplicates_total": uplink.duplicates_total + received,
                    "last_upload_at_ms": received_at_ms,
                },
            )
            return IngestOutcome(acked_seq=watermark, stored=0, duplicates=received, evicted=0)

        # Records at or below the watermark are stored already or were declared evicted: never insert them.
        start = bisect.bisect_right(batch.seqs, watermark)
        stored = self._insert_rows(conn, batch.rows[start:]) if start < received else 0
        max_stored_seq = max(uplink.max_stored_seq, batch.seqs[-1]) if start < received else uplink.max_stored_seq
        acked_seq, evicted = watermark, 0
        if placement is Placement.ADVANCES:
            acked_seq = batch.through_seq
            if uplink.max_stored_seq > watermark:
                # An earlier batch past a gap stored seqs in this range: ask the table what is there.
                present: Sequence[int] = _stored_seqs(conn, device_id, watermark, acked_seq)
            else:
                present = batch.seqs[start:]
            ranges = missing_ranges(watermark, acked_seq, present)
            if ranges:
                evicted = _record_evictions(conn, device_id, ranges, received_at_ms)
        conn.execute(
            _UPDATE_UPLINK,
            {
                "key": device_id,
                "acked_seq": acked_seq,
                "max_stored_seq": max_stored_seq,
                "stored_total": uplink.stored_total + stored,
                "duplicates_total": uplink.duplicates_total + received - stored,
                "evicted_total": uplink.evicted_total + evicted,
                # Counters only grow on the device: an older batch arriving after a newer one must not lower them.
                "device_produced_total": max(uplink.device_produced_total, batch.device_produced_total),
                "device_evicted_total": max(uplink.device_evicted_total, batch.device_evicted_total),
                "last_upload_at_ms": received_at_ms,
            },
        )
        return IngestOutcome(acked_seq=acked_seq, stored=stored, duplicates=received - stored, evicted=evicted)

    def results(
        self, device_id: str | None = None, after_id: int = 0, limit: int = 100, *, received_before_ms: int = 0
    ) -> list[StoredResult]:
        """Stored results with id > `after_id` in id order, at most `limit`; pass the last id back to go on.

        On SQLite ids follow commit order. On PostgreSQL they are drawn at insert, before commit, so with
        concurrent uploads a batch can become visible below a cursor that already passed it: a tail that must
        see every row stays a few seconds behind with `received_before_ms` (ingest transactions last
        milliseconds), and stops at the first row newer than that.
        """
        if not 1 <= limit <= MAX_PAGE:
            raise InvalidArgument(f"limit must be 1..{MAX_PAGE}, not {limit}")
        if after_id < 0:
            raise InvalidArgument(f"after_id must be >= 0, not {after_id}")
        query = sa.select(results).where(results.c.id > after_id).order_by(results.c.id).limit(limit)
        if device_id is not None:
            query = query.where(results.c.device_id == device_id)
        if received_before_ms:
            # Not a filter on the page but a cut: nothing past the first unsettled row, so the cursor never
            # passes a row that may still have a lower-id neighbour committing.
            rows = self._db.read(lambda conn: conn.execute(query).all())
            settled = []
            for row in rows:
                if row.received_at_ms >= received_before_ms:
                    break
                settled.append(StoredResult(**row._mapping))
            return settled
        rows = self._db.read(lambda conn: conn.execute(query).all())
        return [StoredResult(**row._mapping) for row in rows]

    def cursor_before_last(self, device_id: str | None, last: int) -> int:
        """The `after_id` from which `results` returns the newest `last` rows (of one device, or all)."""
        if not 0 <= last <= MAX_PAGE:
            raise InvalidArgument(f"last must be 0..{MAX_PAGE}, not {last}")
        query = sa.select(results.c.id).order_by(results.c.id.desc()).offset(last).limit(1)
        if device_id is not None:
            query = query.where(results.c.device_id == device_id)
        row = self._db.read(lambda conn: conn.execute(query).first())
        return int(row.id) if row is not None else 0

    def reconcile(self, device_id: str) -> Reconciliation:
        """The device's upload counters; raises NotFound for an unknown device."""
        query = sa.select(device_uplink).where(device_uplink.c.device_id == device_id)
        row = self._db.read(lambda conn: conn.execute(query).one_or_none())
        if row is None:
            raise NotFound(f"no device {device_id!r} is registered")
        return Reconciliation(
            stored=row.stored_total,
            evicted=row.evicted_total,
            device_produced=row.device_produced_total,
            device_evicted=row.device_evicted_total,
            acked_seq=row.acked_seq,
            duplicates_total=row.duplicates_total,
            max_stored_seq=row.max_stored_seq,
            last_upload_at_ms=row.last_upload_at_ms,
        )

    def seqs(self, device_id: str) -> list[int]:
        """Every stored seq of the device, ascending (for tests and audits; not for large devices)."""
        query = sa.select(results.c.seq).where(results.c.device_id == device_id).order_by(results.c.seq)
        return self._db.read(lambda conn: list(conn.execute(query).scalars()))

    def eviction_ranges(self, device_id: str) -> list[tuple[int, int]]:
        """The inclusive seq ranges the device declared evicted, ascending (the audit trail of `evicted`)."""
        query = (
            sa.select(evictions.c.from_seq, evictions.c.to_seq)
            .where(evictions.c.device_id == device_id)
            .order_by(evictions.c.from_seq)
        )
        return self._db.read(lambda conn: [(row.from_seq, row.to_seq) for row in conn.execute(query)])


def _stored_seqs(conn: sa.Connection, device_id: str, after_seq: int, through_seq: int) -> list[int]:
    query = (
        sa.select(results.c.seq)
        .where(results.c.device_id == device_id, results.c.seq > after_seq, results.c.seq <= through_seq)
        .order_by(results.c.seq)
    )
    return list(conn.execute(query).scalars())


def _record_evictions(conn: sa.Connection, device_id: str, ranges: list[tuple[int, int]], recorded_at_ms: int) -> int:
    conn.execute(
        evictions.insert(),
        [
            {"device_id": device_id, "from_seq": low, "to_seq": high, "recorded_at_ms": recorded_at_ms}
            for low, high in ranges
        ],
    )
    return sum(high - low + 1 for low, high in ranges)


# SQLAlchemy 2 reports rowcount for INSERT only when asked to keep it.
_COUNT_ROWS = {"preserve_rowcount": True}


def _checked_count(count: int, rows: Sequence[object]) -> int:
    # The count decides stored vs duplicates; a driver that cannot tell must fail loudly, not skew counters.
    if not 0 <= count <= len(rows):
        raise RuntimeError(f"the database driver reported {count} rows inserted out of {len(rows)}")
    return count


Inserter = Callable[[sa.Connection, Sequence[tuple[object, ...]]], int]


def _executemany_inserter(backend: str) -> Inserter:
    """The dialect's INSERT ... ON CONFLICT (device_id, seq) DO NOTHING, run as one executemany of plain tuples
    straight to the driver: sqlite3 and psycopg (pipeline mode) both sum rowcount over the rows, and a row
    that conflicted counts 0. Measured on PostgreSQL it beat a single INSERT ... SELECT FROM unnest(arrays).
    """
    # Positional parameters (qmark for sqlite3, format for psycopg), so rows stay plain tuples.
    dialect_class = cast("Callable[..., sa.Dialect]", sa.make_url(f"{backend}://").get_dialect())
    dialect = dialect_class(paramstyle="qmark" if backend == "sqlite" else "format")
    upsert = sqlite.insert(results) if backend == "sqlite" else postgresql.insert(results)
    # inline(): no RETURNING of the new ids (PostgreSQL would otherwise return a row per insert).
    statement = upsert.inline().on_conflict_do_nothing(index_elements=["device_id", "seq"])
    compiled = statement.compile(dialect=dialect, column_keys=list(ROW_COLUMNS))
    if tuple(compiled.positiontup or ()) != ROW_COLUMNS:
        raise AssertionError(f"insert parameters out of order: {compiled.positiontup}")
    sql = str(compiled)

    def insert(conn: sa.Connection, rows: Sequence[tuple[object, ...]]) -> int:
        return _checked_count(conn.exec_driver_sql(sql, list(rows), _COUNT_ROWS).rowcount, rows)

    return insert
