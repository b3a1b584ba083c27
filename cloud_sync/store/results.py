"""Result ingest (exactly-once per (device_id, seq)) and the operators' queries over stored results.

The protocol rules live in batches.py; this module applies them in one transaction per batch. Synchronous by
design: the gRPC servicer calls it from a thread pool, never on the event loop.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import chain
from typing import Any, cast

import sqlalchemy as sa
from sqlalchemy import exc as sa_exc
from sqlalchemy.dialects import postgresql, sqlite

from cloud_sync.errors import CloudSyncError, DeviceRevoked, InvalidArgument, NotFound
from cloud_sync.store.batches import ROW_COLUMNS, IngestLimits, QuarantinedRecord, ValidBatch, validate_batch
from cloud_sync.store.database import Database, now_ms
from cloud_sync.store.ledger import DeviceLedger, Placement, check_ledger, place, plan_ingest
from cloud_sync.store.schema import device_uplink, devices, evictions, quarantine, results
from edgefleet.proto.edgefleet.v1 import results_pb2

__all__ = ["MAX_PAGE", "IngestOutcome", "QuarantineEntry", "Reconciliation", "ResultStore", "StoredResult"]

# The most rows one `results()` call returns.
MAX_PAGE = 10_000
# Rows per multi-row INSERT on SQLite (12 parameters each: 768, far under SQLite's 32766).
SQLITE_ROWS_PER_INSERT = 64


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
    # Seqs newly counted as rejected: records of this batch quarantined here, rejections the device declared.
    rejected: int = 0
    # Every seq of (after_seq, min(acked_seq, through_seq)] the cloud counts as rejected, ascending: the device
    # counts those as rejected when it deletes them, even if the ack that first named them was lost.
    rejected_seqs: tuple[int, ...] = ()
    # (seq, reason) of the records quarantined here by this batch, for the log.
    quarantined: tuple[tuple[int, str], ...] = ()


@dataclass(frozen=True)
class Reconciliation:
    """One device's upload counters, so an operator can check stored + evicted + rejected = produced."""

    stored: int
    evicted: int
    # The device's own counters, as it last reported them.
    device_produced: int
    device_evicted: int
    acked_seq: int
    duplicates_total: int
    # Above acked_seq only while records stored (or quarantined) past a gap wait for the seqs before them.
    max_stored_seq: int
    last_upload_at_ms: int | None
    # Seqs in the quarantine: records rejected here, and those the device declared it quarantined.
    rejected: int = 0
    device_rejected: int = 0
    # Stored records stamped more than the clock tolerance ahead of the cloud's clock (the device's clock is
    # fast), and the largest such skew seen; their timestamps are stored as the device reported them.
    clock_skewed_total: int = 0
    max_clock_skew_ms: int = 0


@dataclass(frozen=True)
class QuarantineEntry:
    """A seq the cloud counts as rejected: why, and what it kept of the record (none for a declared one)."""

    device_id: str
    seq: int
    reason: str
    source: str  # "cloud" (failed here) or "device" (the device quarantined it)
    created_at_ms: int | None
    received_at_ms: int
    record: bytes | None  # the first bytes of the serialized ResultRecord
    record_size: int


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
    checksum: int | None = None  # RECORD_CHECKSUM_CRC32, verified at ingest; None from agents that send none


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

    def ingest_many(
        self, device_id: str, batches: Sequence[results_pb2.ResultBatch]
    ) -> tuple[list[IngestOutcome], Exception | None]:
        """`ingest` of consecutive batches of one stream in order, in one transaction (one commit, one fsync).

        Each batch is applied in its own savepoint, as if ingested alone: the outcomes of the batches stored
        before the first that failed, and that failure (None when all were stored); batches after a failed
        one are not applied, as a stream stops at its first refusal. StoreUnavailable is raised (nothing was
        committed then; retrying is safe).
        """
        received_at_ms = now_ms()
        valid: list[ValidBatch] = []
        refused: Exception | None = None
        for batch in batches:
            try:
                valid.append(validate_batch(device_id, batch, self.limits, received_at_ms))
            except CloudSyncError as exc:
                refused = exc
                break
        if not valid:
            return [], refused

        def apply(conn: sa.Connection) -> tuple[list[IngestOutcome], Exception | None]:
            outcomes: list[IngestOutcome] = []
            for one in valid:
                try:
                    with conn.begin_nested():
                        outcomes.append(self._apply(conn, device_id, one, received_at_ms))
                except CloudSyncError as exc:  # a refusal: its savepoint undid it
                    return outcomes, exc
            return outcomes, refused

        return self._db.write(apply)

    def _apply(self, conn: sa.Connection, device_id: str, batch: ValidBatch, received_at_ms: int) -> IngestOutcome:
        uplink = conn.execute(_LOCK_UPLINK, {"device_id": device_id}).one_or_none()
        if uplink is None:
            raise NotFound(f"no device {device_id!r} is registered")
        if uplink.revoked_at_ms is not None:
            raise DeviceRevoked(f"device {device_id!r} was revoked; its uploads are refused")
        before = _ledger(uplink)
        watermark = before.acked_seq
        placement = place(batch.after_seq, batch.through_seq, watermark)
        if placement is Placement.REPLAY:
            check_ledger(batch, before, before)
            conn.execute(
                _UPDATE_UPLINK,
                {
                    "key": device_id,
                    "duplicates_total": uplink.duplicates_total + batch.received,
                    "last_upload_at_ms": received_at_ms,
                },
            )
            return IngestOutcome(
                acked_seq=watermark,
                stored=0,
                duplicates=batch.received,
                evicted=0,
                rejected_seqs=_rejected_seqs(conn, device_id, batch.after_seq, batch.through_seq, before.rejected),
            )

        # Seqs of this range an earlier batch past a gap stored or quarantined (none in the usual case).
        accounted = (
            _accounted_seqs(conn, device_id, watermark, batch.through_seq) if before.max_stored_seq > watermark else []
        )
        plan = plan_ingest(batch, before, placement, accounted)
        after = plan.after
        check_ledger(batch, before, after)

        stored = self._insert_rows(conn, plan.rows) if plan.rows else 0
        rejected_new = _quarantine(conn, device_id, plan.quarantined, received_at_ms)
        declared_new = _quarantine(conn, device_id, plan.declared, received_at_ms)
        if plan.evictions:
            _record_evictions(conn, device_id, plan.evictions, received_at_ms)
        skews = plan.skews
        conn.execute(
            _UPDATE_UPLINK,
            {
                "key": device_id,
                "acked_seq": after.acked_seq,
                "max_stored_seq": after.max_stored_seq,
                "stored_total": before.stored + stored,
                "duplicates_total": uplink.duplicates_total + batch.received - stored - rejected_new,
                "evicted_total": after.evicted,
                "rejected_total": before.rejected + rejected_new + declared_new,
                "rejected_on_device_total": before.rejected_on_device + declared_new,
                "device_produced_total": after.device_produced,
                "device_evicted_total": after.device_evicted,
                "device_rejected_total": after.device_rejected,
                "clock_skewed_total": uplink.clock_skewed_total + len(skews),
                "max_clock_skew_ms": max(uplink.max_clock_skew_ms, *skews) if skews else uplink.max_clock_skew_ms,
                "last_upload_at_ms": received_at_ms,
            },
        )
        rejected_total = before.rejected + rejected_new + declared_new
        return IngestOutcome(
            acked_seq=after.acked_seq,
            stored=stored,
            duplicates=batch.received - stored - rejected_new,
            evicted=after.evicted - before.evicted,
            rejected=rejected_new + declared_new,
            rejected_seqs=_rejected_seqs(
                conn, device_id, batch.after_seq, min(after.acked_seq, batch.through_seq), rejected_total
            ),
            quarantined=tuple((q.seq, q.reason) for q in plan.quarantined),
        )

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
            rejected=row.rejected_total,
            device_rejected=row.device_rejected_total,
            clock_skewed_total=row.clock_skewed_total,
            max_clock_skew_ms=row.max_clock_skew_ms,
        )

    def quarantine(self, device_id: str, after_seq: int = 0, limit: int = 100) -> list[QuarantineEntry]:
        """The device's seqs counted as rejected with seq > after_seq, ascending, at most `limit`.

        Raises NotFound for an unknown device (an empty list means a registered device has none past
        `after_seq`).
        """
        if not 1 <= limit <= MAX_PAGE:
            raise InvalidArgument(f"limit must be 1..{MAX_PAGE}, not {limit}")
        query = (
            sa.select(quarantine)
            .where(quarantine.c.device_id == device_id, quarantine.c.seq > after_seq)
            .order_by(quarantine.c.seq)
            .limit(limit)
        )
        registered = sa.select(devices.c.device_id).where(devices.c.device_id == device_id)

        def read(conn: sa.Connection) -> Sequence[sa.Row[Any]]:
            rows = conn.execute(query).all()
            # A row proves the device exists (foreign key): only an empty page needs the second query.
            if not rows and conn.execute(registered).first() is None:
                raise NotFound(f"no device {device_id!r} is registered")
            return rows

        rows = self._db.read(read)
        return [QuarantineEntry(**{k: v for k, v in row._mapping.items() if k != "id"}) for row in rows]

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


def _ledger(uplink: Any) -> DeviceLedger:
    return DeviceLedger(
        acked_seq=uplink.acked_seq,
        max_stored_seq=uplink.max_stored_seq,
        stored=uplink.stored_total,
        evicted=uplink.evicted_total,
        rejected=uplink.rejected_total,
        rejected_on_device=uplink.rejected_on_device_total,
        device_produced=uplink.device_produced_total,
        device_evicted=uplink.device_evicted_total,
        device_rejected=uplink.device_rejected_total,
    )


def _accounted_seqs(conn: sa.Connection, device_id: str, after_seq: int, through_seq: int) -> list[int]:
    """Seqs of (after_seq, through_seq] stored or quarantined, ascending."""
    stored = sa.select(results.c.seq).where(
        results.c.device_id == device_id, results.c.seq > after_seq, results.c.seq <= through_seq
    )
    held = sa.select(quarantine.c.seq).where(
        quarantine.c.device_id == device_id, quarantine.c.seq > after_seq, quarantine.c.seq <= through_seq
    )
    return sorted(set(conn.execute(stored).scalars()).union(conn.execute(held).scalars()))


def _rejected_seqs(
    conn: sa.Connection, device_id: str, after_seq: int, through_seq: int, rejected: int
) -> tuple[int, ...]:
    """Quarantined seqs of (after_seq, through_seq]; no query for a device that never had one rejected."""
    if not rejected or through_seq <= after_seq:
        return ()
    query = (
        sa.select(quarantine.c.seq)
        .where(quarantine.c.device_id == device_id, quarantine.c.seq > after_seq, quarantine.c.seq <= through_seq)
        .order_by(quarantine.c.seq)
    )
    return tuple(conn.execute(query).scalars())


def _quarantine(conn: sa.Connection, device_id: str, records: Sequence[QuarantinedRecord], received_at_ms: int) -> int:
    """Insert quarantine rows (idempotent on (device_id, seq)); returns how many are new."""
    if not records:
        return 0
    insert = (
        sqlite.insert(quarantine) if conn.dialect.name == "sqlite" else postgresql.insert(quarantine)
    ).on_conflict_do_nothing(index_elements=["device_id", "seq"])
    rows = [
        {
            "device_id": device_id,
            "seq": q.seq,
            "reason": q.reason,
            "source": q.source,
            "created_at_ms": q.created_at_ms,
            "received_at_ms": received_at_ms,
            "record": q.record,
            "record_size": q.record_size,
        }
        for q in records
    ]
    return sum(_checked_count(conn.execute(insert, row, execution_options=_COUNT_ROWS).rowcount, [row]) for row in rows)


def _record_evictions(conn: sa.Connection, device_id: str, ranges: list[tuple[int, int]], recorded_at_ms: int) -> None:
    conn.execute(
        evictions.insert(),
        [
            {"device_id": device_id, "from_seq": low, "to_seq": high, "recorded_at_ms": recorded_at_ms}
            for low, high in ranges
        ],
    )


# SQLAlchemy 2 reports rowcount for INSERT only when asked to keep it.
_COUNT_ROWS = {"preserve_rowcount": True}


def _checked_count(count: int, rows: Sequence[object]) -> int:
    # The count decides stored vs duplicates; a driver that cannot tell must fail loudly, not skew counters.
    if not 0 <= count <= len(rows):
        raise RuntimeError(f"the database driver reported {count} rows inserted out of {len(rows)}")
    return count


Inserter = Callable[[sa.Connection, Sequence[tuple[object, ...]]], int]


def _executemany_inserter(backend: str) -> Inserter:
    """The dialect's INSERT ... ON CONFLICT (device_id, seq) DO NOTHING of plain tuples, straight to the driver:
    sqlite3 and psycopg (pipeline mode) both sum rowcount over the rows, and a row that conflicted counts 0.

    On SQLite the rows go as multi-row INSERTs of SQLITE_ROWS_PER_INSERT (one executemany of those, then one
    INSERT of the rest): sqlite3 binds, steps and re-takes the GIL per statement, and per row that cost
    ~1 us a record more (3.8 -> 2.7 us of CPU a record for 1000-row batches, measured). On PostgreSQL: COPY.
    """
    if backend != "sqlite":
        return _copy_inserter()

    per = SQLITE_ROWS_PER_INSERT
    width = len(ROW_COLUMNS) * per
    statements = {per: _insert_sql(backend, per)}

    def insert_sqlite(conn: sa.Connection, rows: Sequence[tuple[object, ...]]) -> int:
        values = list(chain.from_iterable(rows))
        full = len(rows) // per
        count = 0
        if full:
            chunks = [tuple(values[i : i + width]) for i in range(0, full * width, width)]
            count += conn.exec_driver_sql(statements[per], chunks, _COUNT_ROWS).rowcount
        rest = len(rows) - full * per
        if rest:
            statement = statements.get(rest) or statements.setdefault(rest, _insert_sql(backend, rest))
            count += conn.exec_driver_sql(statement, tuple(values[full * width :]), _COUNT_ROWS).rowcount
        return _checked_count(count, rows)

    return insert_sqlite


# PostgreSQL: the batch is COPYed (binary) into a temporary table, then moved with INSERT ... ON CONFLICT DO
# NOTHING in one statement. Measured against executemany in pipeline mode, 1000-row batches: cloud-sync's CPU
# 11-12 -> 1.5 us a record, and the server's rate no lower.
_STAGE = "results_stage"
_STAGE_TYPES = ("text", "int8", "int8", "text", "int8", "int8", "int2", "text", "bytea", "text", "int8", "int8")
_COLUMNS = ", ".join(ROW_COLUMNS)
_CREATE_STAGE = (
    f"CREATE TEMPORARY TABLE IF NOT EXISTS {_STAGE} ON COMMIT DELETE ROWS "
    f"AS SELECT {_COLUMNS} FROM results WITH NO DATA"
)
_COPY_STAGE = f"COPY {_STAGE} ({_COLUMNS}) FROM STDIN (FORMAT BINARY)"
# Emptying the stage as it moves, so a second batch in the same transaction moves only its own rows; in seq
# order, so result ids follow seqs as executemany's did.
_MOVE_STAGE = (
    f"WITH staged AS (DELETE FROM {_STAGE} RETURNING {_COLUMNS}) INSERT INTO results ({_COLUMNS}) "
    f"SELECT {_COLUMNS} FROM staged ORDER BY seq ON CONFLICT (device_id, seq) DO NOTHING"
)


def _copy_inserter() -> Inserter:
    import psycopg  # the PostgreSQL driver: imported only where the store is PostgreSQL

    def insert(conn: sa.Connection, rows: Sequence[tuple[object, ...]]) -> int:
        # IF NOT EXISTS every time: a savepoint rolled back since may have taken the table with it.
        conn.exec_driver_sql(_CREATE_STAGE)
        raw = cast("psycopg.Connection[Any]", conn.connection.driver_connection)
        try:
            with raw.cursor() as cursor, cursor.copy(_COPY_STAGE) as copy:
                copy.set_types(list(_STAGE_TYPES))
                for row in rows:
                    copy.write_row(row)
        except psycopg.Error as exc:  # as SQLAlchemy wraps the driver's errors, for Database to translate
            raise sa_exc.DBAPIError.instance(_COPY_STAGE, None, exc, psycopg.Error) from exc
        return _checked_count(conn.exec_driver_sql(_MOVE_STAGE, execution_options=_COUNT_ROWS).rowcount, rows)

    return insert


def _insert_sql(backend: str, rows: int) -> str:
    """INSERT INTO results (ROW_COLUMNS) VALUES (...) x rows ON CONFLICT (device_id, seq) DO NOTHING, with
    positional parameters (qmark for sqlite3, format for psycopg) so rows stay plain tuples."""
    dialect_class = cast("Callable[..., sa.Dialect]", sa.make_url(f"{backend}://").get_dialect())
    dialect = dialect_class(paramstyle="qmark" if backend == "sqlite" else "format")
    upsert = sqlite.insert(results) if backend == "sqlite" else postgresql.insert(results)
    # inline(): no RETURNING of the new ids (PostgreSQL would otherwise return a row per insert).
    statement = upsert.inline().on_conflict_do_nothing(index_elements=["device_id", "seq"])
    compiled = statement.compile(dialect=dialect, column_keys=list(ROW_COLUMNS))
    if tuple(compiled.positiontup or ()) != ROW_COLUMNS:
        raise AssertionError(f"insert parameters out of order: {compiled.positiontup}")
    sql = str(compiled)
    if rows == 1:
        return sql
    head, values, tail = sql.partition(" VALUES ")
    one, _, conflict = tail.partition(") ")
    if one.count("(") != 1 or not conflict.startswith("ON CONFLICT"):
        raise AssertionError(f"cannot repeat the VALUES of {sql!r}")
    return f"{head}{values}{', '.join([one + ')'] * rows)} {conflict}"
