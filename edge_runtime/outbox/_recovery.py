"""Opening the outbox file with a check, and what happens when the check finds it damaged.

The decision (a device serves inference first; its results buffer is second): a damaged file is moved
aside, not deleted, every record still readable is copied into a fresh file with its seq, the sequence
continues after the old last_seq, and the records that could not be read are counted as evicted and
logged at error level — so the cloud's `stored + evicted + rejected = produced` still balances and an
operator can recover more from the moved file (`sqlite3 FILE .recover`). Starting at seq 1 instead would make the
cloud take new records for replays of old ones (it is idempotent on (device_id, seq)) and drop them; so
when even the counters cannot be read, the agent refuses to start and says what to do, leaving the file
where it is.
"""

from __future__ import annotations

import datetime
import os
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import structlog

from edge_runtime.outbox._policy import record_bytes
from edge_runtime.outbox._record import convertible_problem, record_checksum
from edge_runtime.outbox._schema import (
    COUNTER_NAMES,
    QUARANTINE_COLUMNS,
    SCHEMA_VERSION,
    connect,
    migrate,
    read_counters,
    write_counters,
)
from edge_runtime.outbox._types import OutboxUnusable
from edgefleet.durable import fsync_dir

__all__ = ["open_checked"]

log = structlog.get_logger(__name__)

# A version-1 file has no checksum column: its records get theirs computed as they are copied.
_V1_COLUMNS = "seq, created_at_ms, model, version, priority, kind, payload_type, payload, request_id, size"
_COLUMNS = f"{_V1_COLUMNS}, checksum"
_INSERT = f"INSERT INTO records ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
_QUARANTINE = ", ".join(QUARANTINE_COLUMNS)
_INSERT_QUARANTINE = f"INSERT INTO quarantine ({_QUARANTINE}) VALUES (?, ?, ?, ?, ?, ?)"
# Past a damaged page, this many seqs must look up cleanly before a range scan is tried again.
_CLEAN_RUN = 64


def open_checked(path: Path, *, max_file_bytes: int | None) -> sqlite3.Connection:
    """The writer connection to `path`, migrated; a damaged file is salvaged into a fresh one first.

    PRAGMA quick_check, not integrity_check: it finds the same damage to pages and b-trees and reads
    each page once, without cross-checking index entries against rows (O(N) instead of O(N log N)).
    """
    problems: list[str] = []
    try:
        conn = connect(path, max_file_bytes=max_file_bytes)
        try:
            problems = [str(row[0]) for row in conn.execute("PRAGMA quick_check(10)")]
            problems = [] if problems == ["ok"] else problems
        except sqlite3.OperationalError:
            conn.close()
            raise
        except sqlite3.DatabaseError as exc:
            problems = [str(exc)]
        if not problems:
            found = migrate(conn, path)
            if 0 < found < SCHEMA_VERSION:
                log.info("outbox.migrated", path=str(path), from_version=found, to_version=SCHEMA_VERSION)
            return conn
        conn.close()
    except sqlite3.OperationalError as exc:  # locked past busy_timeout, I/O error, no permission
        raise OutboxUnusable(f"cannot open outbox {path}: {exc}") from exc
    except sqlite3.DatabaseError as exc:  # "file is not a database", malformed schema
        problems = [str(exc)]
    return _salvage(path, problems, max_file_bytes)


def _salvage(path: Path, problems: list[str], max_file_bytes: int | None) -> sqlite3.Connection:
    counters = _damaged_counters(path, problems)
    aside = _move_aside(path)
    conn = connect(path, max_file_bytes=max_file_bytes)
    try:
        migrate(conn, path)
        kept, kept_bytes = _copy_records(aside, conn, counters)
    except BaseException:
        conn.close()
        raise
    lost = max(counters["depth"] + counters["quarantined"] - kept, 0)
    log.error(
        "outbox.corrupt",
        path=str(path),
        moved_to=str(aside),
        problems=problems[:5],
        salvaged=kept,
        lost=lost,
        last_seq=counters["last_seq"],
    )
    if lost:
        log.info("outbox.evicted", records=lost, bytes=max(counters["bytes"] - kept_bytes, 0), reason="corrupt")
    return conn


def _damaged_counters(path: Path, problems: list[str]) -> dict[str, int]:
    """The counters of a damaged file, or OutboxUnusable (the file left in place) when they cannot be read."""
    try:
        conn = sqlite3.connect(str(path), isolation_level=None)
    except sqlite3.Error as exc:
        raise _unsalvageable(path, problems, exc) from exc
    try:
        counters = read_counters(conn, upgrading=True)
    except sqlite3.Error as exc:
        raise _unsalvageable(path, problems, exc) from exc
    finally:
        conn.close()
    c = counters
    if min(c.values()) < 0 or not c["acked_seq"] <= c["in_doubt_seq"] <= c["last_seq"]:
        raise _unsalvageable(path, problems, f"inconsistent counters {c}")
    return counters


def _unsalvageable(path: Path, problems: list[str], why: object) -> OutboxUnusable:
    return OutboxUnusable(
        f"outbox {path} is damaged ({'; '.join(problems[:3])}) and its counters cannot be read ({why}), so this "
        "device cannot continue its sequence numbers. Stop the agent, then either recover the file "
        f"(`sqlite3 {path} .recover | sqlite3 {path}.recovered`, check it, move it over the original) or move "
        "it aside and re-enroll the device (a new device id starts a new sequence; the old id's seqs would be "
        "taken for replays by cloud-sync)."
    )


def _move_aside(path: Path) -> Path:
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    aside = path.with_name(f"{path.name}.corrupt-{stamp}")
    n = 1
    while aside.exists():
        n += 1
        aside = path.with_name(f"{path.name}.corrupt-{stamp}-{n}")
    # The WAL first: a new file at `path` must never meet the old file's -wal, whose frames SQLite would
    # replay into it.
    for suffix in ("-wal", "-shm", ""):
        source = Path(f"{path}{suffix}")
        if source.exists():
            os.replace(source, f"{aside}{suffix}")
    fsync_dir(path.parent)
    return aside


def _copy_records(aside: Path, conn: sqlite3.Connection, counters: dict[str, int]) -> tuple[int, int]:
    """Copy every readable, well-formed record (and quarantine entry) of `aside` past acked_seq into `conn`;
    the counters follow. Returns (records and entries copied, their bytes)."""
    source = sqlite3.connect(str(aside), isolation_level=None)
    kept = kept_bytes = 0
    acked, last_seq = counters["acked_seq"], counters["last_seq"]
    try:
        checksummed = "checksum" in _column_names(source, "records")
        conn.execute("BEGIN IMMEDIATE")
        chunk: list[tuple[Any, ...]] = []
        for row in _readable_rows(source, _COLUMNS if checksummed else _V1_COLUMNS, acked, last_seq):
            if not _well_formed(row) or row[0] <= acked:
                continue
            if not checksummed:
                row = (*row, record_checksum(*row[:9]))
            chunk.append(row)
            kept += 1
            kept_bytes += record_bytes(row[9], row[2], row[6], row[8])
            last_seq = max(last_seq, row[0])
            if len(chunk) >= 1000:
                conn.executemany(_INSERT, chunk)
                chunk.clear()
        conn.executemany(_INSERT, chunk)
        quarantined = _copy_quarantine(source, conn, acked) if counters["quarantined"] else 0
        # Records that could not be read count as evicted: the cloud will never get them.
        evicted = counters["evicted_total"] + max(counters["depth"] + counters["quarantined"] - kept - quarantined, 0)
        values = dict(counters)
        values.update(
            last_seq=last_seq,
            evicted_total=evicted,
            produced_total=counters["delivered_total"] + counters["rejected_total"] + evicted + kept + quarantined,
            depth=kept,
            bytes=kept_bytes,
            quarantined=quarantined,
            recoveries_total=counters["recoveries_total"] + 1,
        )
        write_counters(conn, {name: values[name] for name in COUNTER_NAMES})
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    finally:
        source.close()
    return kept + quarantined, kept_bytes


def _column_names(conn: sqlite3.Connection, table: str) -> set[str]:
    try:
        return {str(row[1]) for row in conn.execute(f"PRAGMA table_info({table})")}
    except sqlite3.DatabaseError:
        return set()


def _copy_quarantine(source: sqlite3.Connection, conn: sqlite3.Connection, acked: int) -> int:
    """Quarantine entries still to be declared to the cloud; an unreadable table copies nothing (those seqs
    are then counted as evicted, as lost records are)."""
    try:
        rows = source.execute(f"SELECT {_QUARANTINE} FROM quarantine WHERE seq > ? ORDER BY seq", (acked,)).fetchall()
    except sqlite3.DatabaseError:
        return 0
    conn.executemany(_INSERT_QUARANTINE, rows)
    return len(rows)


def _readable_rows(conn: sqlite3.Connection, columns: str, after: int, last: int) -> Iterator[tuple[Any, ...]]:
    """Rows in seq order, stepping over damaged pages with lookups seq by seq."""
    scan = f"SELECT {columns} FROM records WHERE seq > ? ORDER BY seq"
    lookup = f"SELECT {columns} FROM records WHERE seq = ?"
    position = after
    while True:
        try:
            for row in conn.execute(scan, (position,)):
                position = row[0]
                yield row
            return
        except sqlite3.DatabaseError:
            pass
        clean = 0
        while clean < _CLEAN_RUN:
            if position >= last:
                return
            position += 1
            try:
                found = conn.execute(lookup, (position,)).fetchone()
            except sqlite3.DatabaseError:
                clean = 0
                continue
            clean += 1
            if found is not None:
                yield found


def _well_formed(row: tuple[Any, ...]) -> bool:
    """Whether a row can be uploaded (what the cloud then accepts is its business; a damaged record whose
    checksum fails is quarantined when read for upload)."""
    seq, created, model, version, priority, kind, payload_type, payload, request_id, size = row[:10]
    return (
        type(seq) is int
        and type(payload) is bytes
        and size == len(payload)
        and (len(row) == 10 or type(row[10]) is int)
        and convertible_problem(created, model, version, priority, kind, payload_type, request_id) is None
    )
