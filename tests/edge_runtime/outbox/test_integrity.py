"""Record checksums and the quarantine: a damaged record never reaches the cloud as a valid one, and every
record is counted once, as delivered, evicted or rejected: produced = held + delivered + evicted + rejected."""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from edge_runtime.outbox import Outbox, OutboxCounters, UploadBatch
from edge_runtime.outbox._store import QUARANTINE_KEEP
from tests.edge_runtime.outbox.conftest import MakeRecord, OpenOutbox, rows

BIG = 1 << 30


def ledger(c: OutboxCounters) -> int:
    return c.depth + c.quarantined + c.delivered_total + c.evicted_total + c.rejected_total


def _filled(path: Path, make_record: MakeRecord, payloads: list[bytes]) -> None:
    """A stopped device's outbox holding one record per payload (closed: everything is in the main file)."""
    with Outbox.open(path, max_bytes=1 << 40, max_age_s=0, commit_interval_s=0.001) as outbox:
        futures = [outbox.append(make_record(i, payload=p)) for i, p in enumerate(payloads)]
        assert [f.result(timeout=10) for f in futures] == list(range(1, len(payloads) + 1))
    assert not Path(f"{path}-wal").exists() or Path(f"{path}-wal").stat().st_size == 0


def _flip_byte_of(path: Path, needle: bytes) -> None:
    """Flip one byte in the middle of `needle` where the file holds it: the page of one record's payload."""
    data = path.read_bytes()
    at = data.find(needle)
    assert at >= 0 and data.find(needle, at + 1) < 0, "the payload must be in the file once"
    with path.open("r+b") as f:
        f.seek(at + len(needle) // 2)
        f.write(bytes([data[at + len(needle) // 2] ^ 0x01]))


def _quarantine_rows(path: Path) -> list[tuple[int, str, bytes, int]]:
    return rows(path, "SELECT seq, reason, payload_head, payload_size FROM quarantine ORDER BY seq")


def test_a_byte_flipped_in_a_records_page_is_quarantined_not_uploaded(
    outbox_path: Path, open_outbox: OpenOutbox, make_record: MakeRecord
) -> None:
    """The outside report: a flipped byte passed quick_check at open and the altered output was uploaded."""
    payloads = [os.urandom(300) for _ in range(200)]
    _filled(outbox_path, make_record, payloads)
    _flip_byte_of(outbox_path, payloads[99])  # seq 100

    with capture_logs() as logs:
        outbox = open_outbox()
        assert not [e for e in logs if e["event"] == "outbox.corrupt"]  # quick_check cannot see it
        batch = outbox.next_batch(1000, BIG)

    assert [r.seq for r in batch.records] == [s for s in range(1, 201) if s != 100]
    assert [r.payload for r in batch.records] == payloads[:99] + payloads[100:]  # nothing altered goes out
    assert batch.rejected_seqs == [100]  # declared to the cloud as rejected
    assert "checksum does not match" in batch.message.rejected[0].reason
    assert (batch.after_seq, batch.through_seq, batch.message.rejected_total) == (0, 200, 1)
    [(seq, reason, head, size)] = _quarantine_rows(outbox_path)
    assert seq == 100 and "the outbox file was damaged" in reason
    assert size == 300 and head != payloads[99] and len(head) == 300  # what was found, kept for the operator
    [logged] = [e for e in logs if e["event"] == "outbox.quarantined"]
    assert (logged["seq"], logged["log_level"]) == (100, "error")
    c = outbox.counters()
    assert (c.depth, c.quarantined, c.rejected_total, c.produced_total) == (199, 1, 0, 200)
    assert ledger(c) == c.produced_total

    # The cloud acknowledges, naming it rejected: it settles as rejected, the rest as delivered.
    outbox.ack(200, [100]).result(timeout=10)
    c = outbox.counters()
    assert (c.depth, c.quarantined, c.delivered_total, c.rejected_total) == (0, 0, 199, 1)
    assert ledger(c) == c.produced_total == 200
    assert [row[0] for row in _quarantine_rows(outbox_path)] == [100]  # kept for the operator after the ack


def test_each_record_is_counted_once_even_when_the_ack_comes_twice(
    open_outbox: OpenOutbox, make_record: MakeRecord
) -> None:
    outbox = open_outbox()
    for i in range(10):
        outbox.append(make_record(i)).result(timeout=10)
    # The cloud rejected 3 and 7 (quarantined there); its first ack was lost, the stream resent, acked again.
    assert outbox.ack(10, [3, 7]).result(timeout=10) == 10
    assert outbox.ack(10, [3, 7]).result(timeout=10) == 10
    c = outbox.counters()
    assert (c.delivered_total, c.rejected_total, c.depth) == (8, 2, 0)
    assert ledger(c) == 10


def test_rejected_seqs_beyond_the_ack_or_already_acked_count_nothing(
    open_outbox: OpenOutbox, make_record: MakeRecord
) -> None:
    outbox = open_outbox()
    for i in range(10):
        outbox.append(make_record(i)).result(timeout=10)
    outbox.ack(4, [2, 6, 99]).result(timeout=10)  # 6 is past this ack: counted when an ack reaches it
    outbox.ack(8, [2, 6]).result(timeout=10)  # 2 was settled by the first ack
    c = outbox.counters()
    assert (c.delivered_total, c.rejected_total, c.depth) == (6, 2, 2)
    assert ledger(c) == 10


def test_a_quarantined_record_the_cloud_had_stored_settles_as_delivered(
    outbox_path: Path, open_outbox: OpenOutbox, make_record: MakeRecord
) -> None:
    """Sent, stored, ack lost, then damaged on disk: the cloud keeps it stored and does not name it."""
    payloads = [os.urandom(300) for _ in range(5)]
    _filled(outbox_path, make_record, payloads)
    _flip_byte_of(outbox_path, payloads[1])
    outbox = open_outbox()
    assert outbox.next_batch(100, BIG).rejected_seqs == [2]
    with capture_logs() as logs:
        outbox.ack(5, []).result(timeout=10)
    c = outbox.counters()
    assert (c.delivered_total, c.rejected_total, c.quarantined) == (5, 0, 0)
    [logged] = [e for e in logs if e["event"] == "outbox.rejected"]
    assert logged["delivered_after_all"] == 1


def test_text_that_is_not_utf8_is_quarantined_and_the_rest_read(
    outbox_path: Path, open_outbox: OpenOutbox, make_record: MakeRecord
) -> None:
    _filled(outbox_path, make_record, [b"p%d" % i for i in range(5)])
    conn = sqlite3.connect(outbox_path)
    conn.execute("UPDATE records SET model = CAST(x'ff6469676974' AS TEXT) WHERE seq = 3")  # as a flipped bit would
    conn.commit()
    conn.close()
    outbox = open_outbox()
    batch = outbox.read_batch(100, BIG)
    assert [r.seq for r in batch.records] == [1, 2, 4, 5] and batch.rejected_seqs == [3]
    assert "model is not valid UTF-8" in batch.message.rejected[0].reason


def test_a_row_of_the_wrong_types_is_quarantined(
    outbox_path: Path, open_outbox: OpenOutbox, make_record: MakeRecord
) -> None:
    _filled(outbox_path, make_record, [b"p%d" % i for i in range(3)])
    conn = sqlite3.connect(outbox_path)
    conn.execute("UPDATE records SET payload = 'text now', version = 'one' WHERE seq = 2")
    conn.commit()
    conn.close()
    batch = open_outbox().read_batch(100, BIG)
    assert [r.seq for r in batch.records] == [1, 3] and batch.rejected_seqs == [2]
    assert "version is str, not int" in batch.message.rejected[0].reason


def test_a_record_past_the_per_record_limit_from_before_it_is_quarantined_not_sent(
    outbox_path: Path, open_outbox: OpenOutbox, make_record: MakeRecord
) -> None:
    """A record kept before the limit existed would be refused by the transport forever: it must not wedge."""
    _filled(outbox_path, make_record, [b"a" * 10, b"b" * 5000, b"c" * 10])
    outbox = open_outbox(max_record_bytes=1000)
    batch = outbox.next_batch(100, BIG)
    assert [r.seq for r in batch.records] == [1, 3] and batch.rejected_seqs == [2]
    assert "payload of 5000 bytes is past the limit of 1000 bytes" in batch.message.rejected[0].reason


def test_quarantine_declarations_survive_a_restart_until_acked(
    outbox_path: Path, open_outbox: OpenOutbox, make_record: MakeRecord
) -> None:
    payloads = [os.urandom(100) for _ in range(6)]
    _filled(outbox_path, make_record, payloads)
    _flip_byte_of(outbox_path, payloads[4])
    first = open_outbox()
    first.next_batch(3, BIG)  # reads 1-3 only; then the agent stops
    assert first.read_batch(100, BIG).rejected_seqs == [5]
    first.close()

    again = open_outbox()
    batches = again.next_batches(4, 2, BIG)
    assert [(b.after_seq, b.through_seq, b.rejected_seqs) for b in batches] == [(0, 2, []), (2, 4, []), (4, 6, [5])]
    assert [r.seq for b in batches for r in b.records] == [1, 2, 3, 4, 6]
    assert again.counters().quarantined == 1


def test_settled_quarantine_entries_are_kept_up_to_a_bound(
    outbox_path: Path, open_outbox: OpenOutbox, make_record: MakeRecord
) -> None:
    n = QUARANTINE_KEEP + 20
    payloads = [os.urandom(64) for _ in range(n)]
    _filled(outbox_path, make_record, payloads)
    for payload in payloads:
        _flip_byte_of(outbox_path, payload)
    outbox = open_outbox()
    batch: UploadBatch = outbox.next_batch(10_000, BIG)
    assert batch.rejected_seqs == list(range(1, n + 1))
    outbox.ack(n, range(1, n + 1)).result(timeout=10)
    kept = [row[0] for row in _quarantine_rows(outbox_path)]
    assert kept == list(range(n - QUARANTINE_KEEP + 1, n + 1))  # the newest
    assert outbox.counters().rejected_total == n


@pytest.mark.parametrize("entries", [0, 3])
def test_a_damaged_file_keeps_its_quarantine_through_salvage(
    outbox_path: Path, open_outbox: OpenOutbox, make_record: MakeRecord, entries: int
) -> None:
    payloads = [os.urandom(500) for _ in range(2000)]
    _filled(outbox_path, make_record, payloads)
    for payload in payloads[:entries]:
        _flip_byte_of(outbox_path, payload)
    outbox = open_outbox()
    outbox.read_batch(10, BIG)  # quarantines the damaged ones among the first ten
    assert outbox.counters().quarantined == entries
    outbox.close()
    # Now a page in the middle of the records table is damaged past quick_check.
    with outbox_path.open("r+b") as f:
        pages = outbox_path.stat().st_size // 4096
        f.seek((pages // 2) * 4096)
        f.write(b"\xff")

    with capture_logs() as logs:
        salvaged = open_outbox()
    [corrupt] = [e for e in logs if e["event"] == "outbox.corrupt"]
    c = salvaged.counters()
    assert c.quarantined == entries and c.evicted_total == corrupt["lost"] > 0
    assert ledger(c) == c.produced_total == c.last_seq == 2000
    batch = salvaged.read_batch(100_000, BIG)
    assert batch.rejected_seqs == list(range(1, entries + 1))
    missing = set(range(1, 2001)) - {r.seq for r in batch.records} - set(batch.rejected_seqs)
    assert len(missing) == corrupt["lost"]  # declared to the cloud as evicted, as counted
