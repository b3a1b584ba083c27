"""The outbox file: connections with the decided pragmas, the schema and its migrations, the counters row set.

SQL for tables comes from sqlite-utils (so `sqlite-utils tables outbox.db --counts` shows the operator the same
names); execution stays here, inside our own transactions.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Mapping
from pathlib import Path

import sqlite_utils

from edge_runtime.outbox._record import record_checksum
from edge_runtime.outbox._types import OutboxUnusable

__all__ = [
    "COUNTER_NAMES",
    "MIGRATIONS",
    "QUARANTINE_COLUMNS",
    "SCHEMA_VERSION",
    "connect",
    "connect_reader",
    "migrate",
    "read_counters",
    "write_counters",
]

BUSY_TIMEOUT_MS = 5000
# The WAL file shrinks back to this after a checkpoint (it would otherwise keep its largest size).
JOURNAL_SIZE_LIMIT = 16 * 1024 * 1024

# The counters of a version-1 file; version 2 added rejected_total and quarantined.
_V1_COUNTERS = (
    "last_seq",
    "produced_total",
    "evicted_total",
    "delivered_total",
    "acked_seq",
    "in_doubt_seq",
    "depth",
    "bytes",
    "recoveries_total",
)
_V2_COUNTERS = ("rejected_total", "quarantined")
COUNTER_NAMES = _V1_COUNTERS + _V2_COUNTERS

# The records table as version 1 made it (version 2 added `checksum`). Frozen: migrations rebuild old files.
_V1_RECORD_COLUMNS = {
    "seq": int,
    "created_at_ms": int,
    "model": str,
    "version": int,
    "priority": int,
    "kind": int,
    "payload_type": str,
    "payload": bytes,
    "request_id": str,
    "size": int,
}


# Records found unfit to upload: kept for the operator (bounded), declared to the cloud as rejected.
QUARANTINE_COLUMNS = {
    "seq": int,
    "reason": str,
    "quarantined_at_ms": int,
    "fields": str,
    "payload_head": bytes,
    "payload_size": int,
}


def connect(path: Path, *, max_file_bytes: int | None = None) -> sqlite3.Connection:
    """A read-write connection in WAL mode with synchronous=FULL (a commit survives power loss).

    isolation_level=None: transactions are explicit (BEGIN IMMEDIATE ... COMMIT), never implied by the
    sqlite3 module. check_same_thread=False: opened here, then owned by the writer thread alone.
    """
    conn = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False, timeout=BUSY_TIMEOUT_MS / 1000)
    try:
        mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise OutboxUnusable(f"outbox {path}: the file system does not allow WAL mode (journal_mode={mode})")
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
        conn.execute(f"PRAGMA journal_size_limit={JOURNAL_SIZE_LIMIT}")
        if max_file_bytes is not None:
            page_size = conn.execute("PRAGMA page_size").fetchone()[0]
            conn.execute(f"PRAGMA max_page_count={max(1, max_file_bytes // page_size)}")
    except BaseException:
        conn.close()
        raise
    return conn


def connect_reader(path: Path) -> sqlite3.Connection:
    """A read-only connection for the uploader or telemetry (WAL lets it read beside the writer)."""
    conn = sqlite3.connect(
        f"{path.resolve().as_uri()}?mode=ro",
        uri=True,
        isolation_level=None,
        check_same_thread=False,
        timeout=BUSY_TIMEOUT_MS / 1000,
    )
    conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
    return conn


def _v1(conn: sqlite3.Connection) -> None:
    db = sqlite_utils.Database(conn)
    conn.execute(db.create_table_sql("records", _V1_RECORD_COLUMNS, pk="seq", not_null=set(_V1_RECORD_COLUMNS)))
    # Eviction walks records by (priority, seq): the rowid is the implicit last column of every index.
    conn.execute('CREATE INDEX "records_priority" ON "records" ("priority")')
    # Age eviction and oldest_created_at_ms.
    conn.execute('CREATE INDEX "records_created_at" ON "records" ("created_at_ms")')
    conn.execute(db.create_table_sql("counters", {"name": str, "value": int}, pk="name", not_null={"value"}))
    conn.executemany("INSERT INTO counters (name, value) VALUES (?, 0)", [(name,) for name in _V1_COUNTERS])


def _v2(conn: sqlite3.Connection) -> None:
    """Record checksums (computed now for the records a version-1 file holds) and the quarantine."""
    conn.execute('ALTER TABLE "records" ADD COLUMN "checksum" INTEGER NOT NULL DEFAULT 0')
    conn.create_function("edgefleet_record_checksum", 9, _checksum_of_row, deterministic=True)
    try:
        conn.execute(
            "UPDATE records SET checksum = edgefleet_record_checksum(seq, created_at_ms, model, version, priority, "
            "kind, payload_type, payload, request_id)"
        )
    finally:
        conn.create_function("edgefleet_record_checksum", 9, None)
    conn.execute(
        sqlite_utils.Database(conn).create_table_sql(
            "quarantine", QUARANTINE_COLUMNS, pk="seq", not_null=set(QUARANTINE_COLUMNS)
        )
    )
    conn.executemany("INSERT INTO counters (name, value) VALUES (?, 0)", [(name,) for name in _V2_COUNTERS])


def _checksum_of_row(*row: object) -> int:
    """A version-1 row's checksum; -1 (which no CRC-32 equals) for a row of the wrong types, so the read
    for upload quarantines it instead of the migration failing and the agent not starting."""
    try:
        return record_checksum(*row)  # type: ignore[arg-type]
    except Exception:
        return -1


# MIGRATIONS[i] takes a file from user_version i to i + 1, inside one transaction with the version bump.
MIGRATIONS: tuple[Callable[[sqlite3.Connection], None], ...] = (_v1, _v2)
SCHEMA_VERSION = len(MIGRATIONS)


def migrate(conn: sqlite3.Connection, path: Path) -> int:
    """Bring the file up to SCHEMA_VERSION; returns the version it had."""
    found = int(conn.execute("PRAGMA user_version").fetchone()[0])
    if found > SCHEMA_VERSION:
        raise OutboxUnusable(
            f"outbox {path} has schema version {found}, newer than this agent knows ({SCHEMA_VERSION}): "
            "it was written by a newer edgefleet; upgrade the agent again, or move the file aside"
        )
    for version in range(found, SCHEMA_VERSION):
        conn.execute("BEGIN IMMEDIATE")
        try:
            MIGRATIONS[version](conn)
            conn.execute(f"PRAGMA user_version={version + 1}")
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
    return found


def read_counters(conn: sqlite3.Connection, *, upgrading: bool = False) -> dict[str, int]:
    """The counters row set; `upgrading`: of a file that may predate the newer counters (they read as 0)."""
    values = {str(name): int(value) for name, value in conn.execute("SELECT name, value FROM counters")}
    if upgrading:
        values = {**dict.fromkeys(_V2_COUNTERS, 0), **values}
    missing = [name for name in COUNTER_NAMES if name not in values]
    if missing:
        raise sqlite3.DatabaseError(f"counters table lacks {', '.join(missing)}")
    return values


def write_counters(conn: sqlite3.Connection, values: Mapping[str, int]) -> None:
    """Inside the caller's transaction, beside the records these values count."""
    conn.executemany("UPDATE counters SET value = ? WHERE name = ?", [(v, k) for k, v in values.items()])
