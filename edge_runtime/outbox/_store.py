"""The outbox's records and counters in SQLite: each change commits in one transaction with the counters it moves.

Used by the writer thread alone (it owns the connection). Keeps a copy of the persisted counters, updated
only once a commit succeeded, and the oldest created_at_ms of all records and of the evictable ones.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import structlog

from edge_runtime.errors import InvalidInput
from edge_runtime.outbox._policy import BYTES_SQL, eviction_goal
from edge_runtime.outbox._schema import read_counters, write_counters
from edge_runtime.outbox._types import QuarantineEntry

__all__ = ["COLUMNS", "RecordStore"]

log = structlog.get_logger(__name__)

COLUMNS = 11  # values per row in RecordStore.insert's params
_CHUNK = 64  # rows per INSERT: 704 parameters, within the 999 of SQLite builds before 3.32
_INSERTS = {
    rows: "INSERT INTO records (seq, created_at_ms, model, version, priority, kind, payload_type, payload, "
    "request_id, size, checksum) VALUES " + ", ".join(["(?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"] * rows)
    for rows in (64, 32, 16, 8, 4, 2, 1)
}
# INDEXED BY: without ANALYZE statistics the planner may sort the whole table instead of walking the index.
_LOWEST = f"SELECT seq, {BYTES_SQL} FROM records INDEXED BY records_priority WHERE seq > ? ORDER BY priority, seq"
_EXPIRED = f"SELECT seq, {BYTES_SQL} FROM records INDEXED BY records_created_at WHERE created_at_ms < ? AND seq > ?"
_AGE_HINT = (
    "SELECT created_at_ms FROM records INDEXED BY records_created_at WHERE seq > ? ORDER BY created_at_ms LIMIT 1"
)
# Rows per eviction transaction: bounds the writer's memory and the time appends wait behind an eviction.
_EVICT_CHUNK = 10_000
# Settled quarantine rows (the cloud acknowledged them) kept for the operator; older ones are deleted.
QUARANTINE_KEEP = 100
# Seqs per `IN (...)` list, within the 999 parameters of SQLite builds before 3.32.
_IN_CHUNK = 500


def now_ms() -> int:
    return time.time_ns() // 1_000_000


class RecordStore:
    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn
        self.counters = read_counters(conn)  # as of the last commit; read-only outside this class
        self.oldest: int | None = None  # min(created_at_ms) of all records
        self.age_hint: int | None = None  # min(created_at_ms) of the records age eviction may take
        self._refresh_hints()

    def insert(self, params: list[Any], added_bytes: int, oldest: int) -> int:
        """Commit rows whose seqs follow last_seq (COLUMNS values each in params); returns the first seq."""
        c = self.counters
        n = len(params) // COLUMNS
        new = {
            "last_seq": c["last_seq"] + n,
            "produced_total": c["produced_total"] + n,
            "depth": c["depth"] + n,
            "bytes": c["bytes"] + added_bytes,
        }
        with self._transaction():
            _insert(self._conn, params)
            write_counters(self._conn, new)
        c.update(new)
        self.oldest = oldest if self.oldest is None else min(self.oldest, oldest)
        self.age_hint = oldest if self.age_hint is None else min(self.age_hint, oldest)
        return new["last_seq"] - n + 1

    def ack(self, seq: int, rejected: frozenset[int] = frozenset()) -> int:
        """Delete records up to seq (the cloud stored them, or counts those in `rejected` as rejected) and
        settle the quarantined ones up to it; acks never move backwards. Returns acked_seq.

        Each record is counted once, as delivered or rejected, by the ack that deletes it: a repeated ack
        (its first answer was lost, the stream was sent again) finds nothing left to count.
        """
        c = self.counters
        if seq <= c["acked_seq"]:
            return c["acked_seq"]  # a late or repeated ack
        if seq > c["last_seq"]:
            raise InvalidInput(f"ack of seq {seq} refused: the outbox's last seq is {c['last_seq']}")
        named = sorted(s for s in rejected if c["acked_seq"] < s <= seq)
        with self._transaction():
            count, size = self._conn.execute(
                f"SELECT count(*), coalesce(sum({BYTES_SQL}), 0) FROM records WHERE seq <= ?", (seq,)
            ).fetchone()
            rejected_held = _count_in(self._conn, "records", named) if named else 0
            settled: list[int] = []
            if c["quarantined"]:
                rows = self._conn.execute(
                    "SELECT seq FROM quarantine WHERE seq > ? AND seq <= ?", (c["acked_seq"], seq)
                ).fetchall()
                settled = [int(row[0]) for row in rows]
            # A record quarantined here that the cloud does not name was stored by it before (sent, then its
            # page went bad before the ack came): delivered after all.
            settled_rejected = len(set(settled).intersection(named))
            self._conn.execute("DELETE FROM records WHERE seq <= ?", (seq,))
            new = {
                "acked_seq": seq,
                "in_doubt_seq": max(c["in_doubt_seq"], seq),
                "depth": c["depth"] - count,
                "bytes": c["bytes"] - size,
                "delivered_total": c["delivered_total"] + count - rejected_held + len(settled) - settled_rejected,
                "rejected_total": c["rejected_total"] + rejected_held + settled_rejected,
                "quarantined": c["quarantined"] - len(settled),
            }
            write_counters(self._conn, new)
            if settled:
                self._trim_quarantine(seq)
        c.update(new)
        self._refresh_hints()
        if rejected_held or settled:
            log.warning(
                "outbox.rejected",
                acked_seq=seq,
                rejected_by_cloud=rejected_held,
                quarantined_settled=len(settled),
                delivered_after_all=len(settled) - settled_rejected,
                rejected_total=new["rejected_total"],
            )
        return seq

    def quarantine(self, entries: Sequence[QuarantineEntry]) -> int:
        """Move records found unfit to upload into the quarantine table; returns how many moved.

        Only records still held past acked_seq move (an eviction or an ack may have taken one since it was
        read). The accounted bytes are summed again over the table: a damaged row's `size` may be wrong.
        """
        c = self.counters
        moved = []
        with self._transaction():
            for entry in entries:
                if entry.seq <= c["acked_seq"]:
                    continue
                if self._conn.execute("DELETE FROM records WHERE seq = ?", (entry.seq,)).rowcount != 1:
                    continue
                self._conn.execute(
                    "INSERT OR REPLACE INTO quarantine (seq, reason, quarantined_at_ms, fields, payload_head, "
                    "payload_size) VALUES (?, ?, ?, ?, ?, ?)",
                    (entry.seq, entry.reason, now_ms(), entry.fields, entry.payload_head, entry.payload_size),
                )
                moved.append(entry)
            if not moved:
                return 0
            held = self._conn.execute(f"SELECT coalesce(sum({BYTES_SQL}), 0) FROM records").fetchone()[0]
            new = {"depth": c["depth"] - len(moved), "bytes": int(held), "quarantined": c["quarantined"] + len(moved)}
            write_counters(self._conn, new)
        c.update(new)
        self._refresh_hints()
        for entry in moved:  # rare: a damaged disk or a bug; each one is worth a line
            log.error("outbox.quarantined", seq=entry.seq, reason=entry.reason, payload_size=entry.payload_size)
        return len(moved)

    def _trim_quarantine(self, acked_seq: int) -> None:
        self._conn.execute(
            "DELETE FROM quarantine WHERE seq <= ? AND seq NOT IN "
            "(SELECT seq FROM quarantine WHERE seq <= ? ORDER BY seq DESC LIMIT ?)",
            (acked_seq, acked_seq, QUARANTINE_KEEP),
        )

    def mark_in_doubt(self, through_seq: int, after_seq: int | None) -> int:
        """Persist that records up to through_seq are being sent; returns those held in (after_seq, through_seq]."""
        c = self.counters
        if through_seq > c["last_seq"]:
            raise InvalidInput(f"in-doubt mark {through_seq} refused: the outbox's last seq is {c['last_seq']}")
        if through_seq > c["in_doubt_seq"]:
            with self._transaction():
                write_counters(self._conn, {"in_doubt_seq": through_seq})
            c["in_doubt_seq"] = through_seq
            self._refresh_hints()
        after = c["acked_seq"] if after_seq is None else max(after_seq, c["acked_seq"])
        row = self._conn.execute("SELECT count(*) FROM records WHERE seq > ? AND seq <= ?", (after, through_seq))
        return int(row.fetchone()[0])

    def evict(self, max_bytes: int, max_age_ms: int) -> None:
        """Expired records first, then lowest priority and oldest past max_bytes; never one in doubt."""
        if max_age_ms and self.age_hint is not None:
            cutoff = now_ms() - max_age_ms
            if self.age_hint < cutoff:
                self._drop("max_age", lambda limit: self._expired(cutoff, limit))
        if eviction_goal(self.counters["bytes"], max_bytes) > 0:
            self._drop("max_bytes", lambda limit: self._lowest(max_bytes, limit))

    def close(self) -> None:
        try:
            self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        except sqlite3.Error as exc:
            log.warning("outbox.checkpoint_failed", error=str(exc))
        self._conn.close()

    def _expired(self, cutoff: int, limit: int) -> list[tuple[int, int]]:
        rows = self._conn.execute(_EXPIRED + " LIMIT ?", (cutoff, self.counters["in_doubt_seq"], limit))
        return [(int(seq), int(size)) for seq, size in rows.fetchall()]

    def _lowest(self, max_bytes: int, limit: int) -> list[tuple[int, int]]:
        goal = eviction_goal(self.counters["bytes"], max_bytes)
        out: list[tuple[int, int]] = []
        freed = 0
        cursor = self._conn.execute(_LOWEST, (self.counters["in_doubt_seq"],))
        try:
            while freed < goal and len(out) < limit:
                row = cursor.fetchone()
                if row is None:
                    break
                out.append((int(row[0]), int(row[1])))
                freed += row[1]
        finally:
            cursor.close()
        return out

    def _drop(self, reason: str, candidates: Callable[[int], list[tuple[int, int]]]) -> None:
        """Delete candidates(limit) in transactions of _EVICT_CHUNK rows until it runs dry; log once."""
        c = self.counters
        records = dropped = 0
        while chunk := candidates(_EVICT_CHUNK):
            size = sum(b for _, b in chunk)
            new = {
                "evicted_total": c["evicted_total"] + len(chunk),
                "depth": c["depth"] - len(chunk),
                "bytes": c["bytes"] - size,
            }
            with self._transaction():
                self._conn.executemany("DELETE FROM records WHERE seq = ?", [(seq,) for seq, _ in chunk])
                write_counters(self._conn, new)
            c.update(new)
            records += len(chunk)
            dropped += size
            if len(chunk) < _EVICT_CHUNK:
                break
        if records:
            self._refresh_hints()
            log.info("outbox.evicted", records=records, bytes=dropped, reason=reason)

    @contextmanager
    def _transaction(self) -> Iterator[None]:
        self._conn.execute("BEGIN IMMEDIATE")
        try:
            yield
            self._conn.execute("COMMIT")
        except BaseException:
            if self._conn.in_transaction:
                try:
                    self._conn.execute("ROLLBACK")
                except sqlite3.Error as exc:
                    log.error("outbox.rollback_failed", error=str(exc))
            raise

    def _refresh_hints(self) -> None:
        self.oldest = self._conn.execute("SELECT min(created_at_ms) FROM records").fetchone()[0]
        row = self._conn.execute(_AGE_HINT, (self.counters["in_doubt_seq"],)).fetchone()
        self.age_hint = None if row is None else row[0]


def _insert(conn: sqlite3.Connection, params: list[Any]) -> None:
    """INSERT the rows of `params`, _CHUNK rows per statement.

    Not executemany: it runs one sqlite3_step per row, and the sqlite3 module releases and re-takes the
    GIL around each; with appenders busy on other threads each re-take waits its turn, and executemany
    ran about 2x slower than multi-row statements with one busy thread beside the writer (measured).
    """
    start = 0
    for size in _chunks(len(params) // COLUMNS):
        end = start + size * COLUMNS
        conn.execute(_INSERTS[size], params[start:end])
        start = end


def _count_in(conn: sqlite3.Connection, table: str, seqs: Sequence[int]) -> int:
    """How many of `seqs` are rows of `table`."""
    found = 0
    for start in range(0, len(seqs), _IN_CHUNK):
        chunk = seqs[start : start + _IN_CHUNK]
        query = f"SELECT count(*) FROM {table} WHERE seq IN ({', '.join('?' * len(chunk))})"
        found += int(conn.execute(query, chunk).fetchone()[0])
    return found


def _chunks(rows: int) -> Iterator[int]:
    """_CHUNK-row pieces, then the rest in powers of two: a handful of distinct statements, all cached."""
    for _ in range(rows // _CHUNK):
        yield _CHUNK
    rest = rows % _CHUNK
    size = _CHUNK
    while rest:
        size //= 2
        if rest & size:
            yield size
            rest -= size
