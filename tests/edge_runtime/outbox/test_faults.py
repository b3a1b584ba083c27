"""Storage faults: a full disk (a real SQLITE_FULL through max_page_count) and a damaged file."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from edge_runtime.errors import EdgeRuntimeError, Overloaded
from edge_runtime.outbox import Outbox, OutboxUnusable
from tests.edge_runtime.outbox.conftest import MakeRecord, OpenOutbox, payload_of, rows


def test_a_full_disk_fails_appends_clearly_and_the_writer_recovers_when_space_returns(
    open_outbox: OpenOutbox, make_record: MakeRecord
) -> None:
    # max_page_count caps the file as a full disk would: SQLite itself raises "database or disk is full".
    outbox = open_outbox(max_file_bytes=256 * 1024)
    stored = 0
    with capture_logs() as logs:
        with pytest.raises(Overloaded) as caught:
            for i in range(1000):
                outbox.append(make_record(i, size=4000)).result(timeout=10)
                stored += 1
        message = str(caught.value)
        assert "outbox storage is full (database or disk is full)" in message
        assert "1 record(s) not stored" in message and "free disk space" in message
        assert 10 < stored < 1000
        with pytest.raises(Overloaded, match="storage is full"):  # still full: still refused, still alive
            outbox.append(make_record(size=4000)).result(timeout=10)
        c = outbox.counters()
        assert (c.failed_total, c.depth, c.last_seq) == (2, stored, stored)  # a failed group takes no seq

        batch = outbox.next_batch(10_000, 1 << 30)  # the cloud takes everything: acks free the space
        outbox.ack(batch.through_seq).result(timeout=10)
        assert outbox.append(make_record(size=4000)).result(timeout=10) == stored + 1
    failed = [e for e in logs if e["event"] == "outbox.write_failed"]
    assert len(failed) == 1  # one line when failures start, not one per group
    assert [e["failed_total"] for e in logs if e["event"] == "outbox.write_recovered"] == [2]
    assert sqlite3.connect(outbox.path).execute("PRAGMA integrity_check").fetchone() == ("ok",)


def _filled(path: Path, make_record: MakeRecord, n: int) -> None:
    with Outbox.open(path, max_bytes=1 << 40, max_age_s=0, commit_interval_s=0.001) as outbox:
        futures = [outbox.append(make_record(i, size=500)) for i in range(n)]
        for future in futures:
            future.result(timeout=10)
        outbox.ack(10).result(timeout=10)


def _records_leaf_in_the_middle(path: Path) -> int:
    """The page number of a leaf of the records table halfway through it."""
    conn = sqlite3.connect(path)
    try:
        pages = [p for (p,) in conn.execute("SELECT pageno FROM dbstat WHERE name = 'records' AND pagetype = 'leaf'")]
    except sqlite3.OperationalError:  # SQLite built without dbstat: any page in the middle of the file
        pages = [path.stat().st_size // 4096 // 2 + 1]
    finally:
        conn.close()
    return pages[len(pages) // 2]


def test_a_damaged_file_is_moved_aside_salvaged_and_counted(
    outbox_path: Path, open_outbox: OpenOutbox, make_record: MakeRecord
) -> None:
    _filled(outbox_path, make_record, 2000)
    page = _records_leaf_in_the_middle(outbox_path)
    with outbox_path.open("r+b") as f:  # the page-type byte of a b-tree page: 13 becomes 0xFF
        f.seek((page - 1) * 4096)
        f.write(b"\xff")

    with capture_logs() as logs:
        outbox = open_outbox()  # no exception: the device keeps serving
    (corrupt,) = [e for e in logs if e["event"] == "outbox.corrupt"]
    assert corrupt["log_level"] == "error" and corrupt["problems"]
    moved = Path(corrupt["moved_to"])
    assert moved.exists() and moved.name.startswith("outbox.db.corrupt-")
    c = outbox.counters()
    assert corrupt["lost"] > 0 and corrupt["salvaged"] == c.depth == 1990 - corrupt["lost"]
    assert (c.last_seq, c.acked_seq, c.recoveries_total) == (2000, 10, 1)
    assert c.evicted_total == corrupt["lost"]  # the records the cloud will never get, declared as such
    assert c.produced_total == c.depth + c.evicted_total + c.delivered_total
    for seq, payload, _ in rows(outbox_path):  # what was salvaged is intact
        assert payload == payload_of(seq - 1, 500)
    assert outbox.append(make_record(size=10)).result(timeout=10) == 2001  # the sequence continues
    batch = outbox.read_batch(100_000, 1 << 30)
    missing = set(range(batch.after_seq + 1, batch.through_seq + 1)) - {r.seq for r in batch.records}
    assert len(missing) == corrupt["lost"]  # declared to the cloud as evicted
    assert sqlite3.connect(outbox_path).execute("PRAGMA integrity_check").fetchone() == ("ok",)


def test_a_file_whose_counters_cannot_be_read_is_refused_with_instructions_and_left_in_place(
    outbox_path: Path, make_record: MakeRecord
) -> None:
    _filled(outbox_path, make_record, 50)
    with outbox_path.open("r+b") as f:  # the header: no longer an SQLite file at all
        f.write(b"this is not an sqlite file at all")
    before = outbox_path.read_bytes()
    with pytest.raises(OutboxUnusable) as caught:
        Outbox.open(outbox_path, max_bytes=1 << 20, max_age_s=0)
    assert isinstance(caught.value, EdgeRuntimeError)
    message = str(caught.value)
    assert "is damaged" in message and "cannot continue its sequence numbers" in message
    assert ".recover" in message and "re-enroll" in message
    assert outbox_path.read_bytes() == before  # nothing moved, nothing rewritten
    assert not list(outbox_path.parent.glob("*.corrupt-*"))
    # The lock was released: once the operator dealt with the file, the agent can start.
    outbox_path.unlink()
    with Outbox.open(outbox_path, max_bytes=1 << 20, max_age_s=0) as outbox:
        assert outbox.counters().last_seq == 0
