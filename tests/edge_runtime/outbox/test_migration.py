"""An outbox file of the previous schema version opens under the current agent, migrated in place.

The version-1 file is made by the version-1 migration itself (frozen in _schema.py) and filled as a
version-1 agent filled it, straight into its tables.
"""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from edge_runtime.outbox import SCHEMA_VERSION, Outbox, OutboxRecord, OutboxUnusable
from edge_runtime.outbox._record import record_checksum
from edge_runtime.outbox._schema import MIGRATIONS
from tests.edge_runtime.outbox.conftest import OpenOutbox, rows

BIG = 1 << 30
V1_INSERT = (
    "INSERT INTO records (seq, created_at_ms, model, version, priority, kind, payload_type, payload, request_id, size) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)


def build_v1(path: Path, payloads: list[bytes], *, acked: int = 0, extra_rows: list[tuple[object, ...]] = ()) -> None:
    """A version-1 outbox holding records acked+1.. with `payloads`, and its counters to match."""
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("BEGIN")
        MIGRATIONS[0](conn)
        conn.execute("PRAGMA user_version=1")
        now = time.time_ns() // 1_000_000
        rows_ = [
            (acked + i + 1, now, "digits", 1, 100, 1, "inference.ModelInferResponse", p, f"r{i}", len(p))
            for i, p in enumerate(payloads)
        ]
        conn.executemany(V1_INSERT, [*rows_, *extra_rows])
        last = acked + len(payloads) + len(extra_rows)
        held = len(payloads) + len(extra_rows)
        counters = {
            "last_seq": last,
            "produced_total": last,
            "delivered_total": acked,
            "acked_seq": acked,
            "in_doubt_seq": acked,
            "depth": held,
            "bytes": sum(len(p) + 6 + 28 + 2 + 64 for p in payloads) + 100 * len(extra_rows),
        }
        conn.executemany("UPDATE counters SET value = ? WHERE name = ?", [(v, k) for k, v in counters.items()])
        conn.execute("COMMIT")
    finally:
        conn.close()


def test_a_version_1_outbox_gets_checksums_and_a_quarantine_and_uploads_as_before(
    outbox_path: Path, open_outbox: OpenOutbox
) -> None:
    payloads = [b"payload %d" % i for i in range(50)]
    build_v1(outbox_path, payloads, acked=7)

    with capture_logs() as logs:
        outbox = open_outbox()

    [migrated] = [e for e in logs if e["event"] == "outbox.migrated"]
    assert (migrated["from_version"], migrated["to_version"]) == (1, SCHEMA_VERSION)
    conn = sqlite3.connect(outbox_path)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    assert {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")} >= {"quarantine"}
    conn.close()
    for seq, created, payload, request_id, checksum in rows(
        outbox_path, "SELECT seq, created_at_ms, payload, request_id, checksum FROM records ORDER BY seq"
    ):
        expected = record_checksum(
            seq, created, "digits", 1, 100, 1, "inference.ModelInferResponse", payload, request_id
        )
        assert checksum == expected
    c = outbox.counters()
    assert (c.last_seq, c.acked_seq, c.depth, c.rejected_total, c.quarantined) == (57, 7, 50, 0, 0)
    batch = outbox.next_batch(1000, BIG)
    assert [r.payload for r in batch.records] == payloads  # every record verifies: none quarantined
    assert batch.rejected_seqs == [] and (batch.after_seq, batch.through_seq) == (7, 57)
    outbox.ack(57).result(timeout=10)
    new = OutboxRecord(time.time_ns() // 1_000_000, "digits", 1, 1, 1, "inference.ModelInferResponse", b"new")
    assert outbox.append(new).result(timeout=10) == 58  # the sequence continues


def test_a_version_1_row_of_the_wrong_types_is_quarantined_after_the_migration_not_a_reason_to_fail(
    outbox_path: Path, open_outbox: OpenOutbox
) -> None:
    bad = (3, "yesterday", "digits", 1, 100, 1, "inference.ModelInferResponse", b"x", "r", 1)
    build_v1(outbox_path, [b"a", b"b"], extra_rows=[bad])
    outbox = open_outbox()  # the agent starts
    batch = outbox.next_batch(100, BIG)
    assert [r.seq for r in batch.records] == [1, 2] and batch.rejected_seqs == [3]
    assert "created_at_ms is str, not int" in batch.message.rejected[0].reason


def test_a_damaged_version_1_file_is_salvaged_with_checksums(outbox_path: Path, open_outbox: OpenOutbox) -> None:
    payloads = [bytes([i % 251]) * 500 for i in range(2000)]
    build_v1(outbox_path, payloads)
    pages = outbox_path.stat().st_size // 4096
    with outbox_path.open("r+b") as f:
        f.seek((pages // 2) * 4096)
        f.write(b"\xff")

    with capture_logs() as logs:
        outbox = open_outbox()

    [corrupt] = [e for e in logs if e["event"] == "outbox.corrupt"]
    assert corrupt["lost"] > 0 and corrupt["salvaged"] == 2000 - corrupt["lost"]
    c = outbox.counters()
    assert c.depth + c.evicted_total == c.produced_total == 2000
    batch = outbox.read_batch(100_000, BIG)
    assert len(batch.records) == c.depth and batch.rejected_seqs == []  # every salvaged record verifies


@pytest.mark.parametrize("version", [SCHEMA_VERSION + 1, SCHEMA_VERSION + 5])
def test_a_newer_file_is_refused_not_migrated(outbox_path: Path, version: int) -> None:
    Outbox.open(outbox_path, max_bytes=1 << 20, max_age_s=0).close()
    conn = sqlite3.connect(outbox_path)
    conn.execute(f"PRAGMA user_version={version}")
    conn.close()
    with pytest.raises(OutboxUnusable, match=f"schema version {version}, newer than this agent knows"):
        Outbox.open(outbox_path, max_bytes=1 << 20, max_age_s=0)
