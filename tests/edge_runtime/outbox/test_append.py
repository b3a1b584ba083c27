"""Appends: group commit from many threads, durability before the future resolves, bounds, close, restart."""

from __future__ import annotations

import sqlite3
import threading
from concurrent.futures import Future
from pathlib import Path

import pytest
import sqlite_utils
from structlog.testing import capture_logs

from edge_runtime.errors import InvalidInput, Overloaded, RequestTooLarge, ShuttingDown
from edge_runtime.outbox import SCHEMA_VERSION, DeferredPayload, Outbox, OutboxUnusable
from tests.edge_runtime.outbox.conftest import MakeRecord, OpenOutbox, payload_of, rows
from tests.waiting import wait_for


def test_appends_from_many_threads_get_unique_gap_free_seqs_in_each_threads_order(
    open_outbox: OpenOutbox, make_record: MakeRecord, outbox_path: Path
) -> None:
    outbox = open_outbox(commit_interval_s=0.002, max_group=100)
    threads, per_thread = 4, 1500
    seqs: dict[int, list[int]] = {}

    def appender(t: int) -> None:
        futures = [outbox.append(make_record(t * per_thread + i)) for i in range(per_thread)]
        seqs[t] = [f.result(timeout=30) for f in futures]

    workers = [threading.Thread(target=appender, args=(t,)) for t in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()

    everything = sorted(s for each in seqs.values() for s in each)
    assert everything == list(range(1, threads * per_thread + 1))
    for each in seqs.values():
        assert each == sorted(each)  # a thread's appends commit in its order
    stored = rows(outbox_path, "SELECT seq, request_id FROM records ORDER BY seq")
    by_seq = {seq: int(req.removeprefix("req-")) for seq, req in stored}
    for t, each in seqs.items():
        assert [by_seq[s] for s in each] == list(range(t * per_thread, (t + 1) * per_thread))
    c = outbox.counters()
    assert (c.depth, c.last_seq, c.produced_total) == (threads * per_thread,) * 3


def test_each_future_resolves_only_after_its_record_is_durable(
    open_outbox: OpenOutbox, make_record: MakeRecord, outbox_path: Path
) -> None:
    outbox = open_outbox(commit_interval_s=0.02)  # callbacks get attached while the group gathers
    seen: list[tuple[int, bytes | None]] = []

    def read_back(future: Future[int]) -> None:  # runs the moment the future resolves
        seq = future.result()
        found = rows(outbox_path, "SELECT payload FROM records WHERE seq = ?", seq)
        seen.append((seq, found[0][0] if found else None))

    futures = [outbox.append(make_record(i, size=300)) for i in range(60)]
    for future in futures:
        future.add_done_callback(read_back)
    wait_for(lambda: len(seen) == 60, what="every callback")  # a callback runs just after result() returns
    assert all(payload == payload_of(seq - 1, 300) for seq, payload in seen)


def test_a_payload_callable_runs_on_the_writer_thread(open_outbox: OpenOutbox, make_record: MakeRecord) -> None:
    outbox = open_outbox()
    ran_on: list[str] = []

    def encode() -> bytes:
        ran_on.append(threading.current_thread().name)
        return b"encoded"

    seq = outbox.append(make_record(payload=DeferredPayload(encode, 7))).result(timeout=10)
    assert ran_on == ["outbox-writer"]
    batch = outbox.read_batch(10, 1 << 20)
    assert [(r.seq, r.payload) for r in batch.records] == [(seq, b"encoded")]


def test_a_bad_record_fails_only_its_own_future(open_outbox: OpenOutbox, make_record: MakeRecord) -> None:
    outbox = open_outbox(commit_interval_s=0.05)  # one group holds them all

    def broken() -> bytes:
        raise ValueError("encoder broke")

    good = outbox.append(make_record(0))
    failing = outbox.append(make_record(1, payload=DeferredPayload(broken, 10)))
    not_bytes = outbox.append(make_record(2, payload=DeferredPayload(lambda: "text", 4)))  # type: ignore[arg-type, return-value]
    bad_priority = outbox.append(make_record(3, priority=-1))
    surrogate = outbox.append(make_record(4)._replace(request_id="\udc80"))  # SQLite would fail the whole group
    also_good = outbox.append(make_record(5))

    assert good.result(timeout=10) == 1
    assert also_good.result(timeout=10) == 2  # seqs stay gap-free: refused records take none
    with pytest.raises(ValueError, match="encoder broke"):
        failing.result(timeout=10)
    with pytest.raises(InvalidInput, match="payload must be bytes"):
        not_bytes.result(timeout=10)
    with pytest.raises(InvalidInput, match="priority"):
        bad_priority.result(timeout=10)
    with pytest.raises(InvalidInput, match="request_id holds a lone surrogate"):
        surrogate.result(timeout=10)
    assert outbox.counters().depth == 2


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        ({"kind": 0}, "kind 0 is not a known RecordKind"),
        ({"kind": 99}, "kind 99 is not a known RecordKind"),
        ({"model": "m" * 129}, "model is 129 characters: cloud-sync accepts at most 128"),
        ({"payload_type": "t" * 257}, "payload_type is 257 characters"),
        ({"request_id": "r" * 129}, "request_id is 129 characters"),
        ({"model": "dig\0its"}, "model contains a NUL character"),
        ({"request_id": "a\0"}, "request_id contains a NUL character"),
        ({"model": "\ud800"}, "model is not valid Unicode text"),
        ({"created_at_ms": 2**63}, "created_at_ms must be an int64"),
    ],
)
def test_a_record_the_cloud_would_reject_is_refused_at_the_door(
    open_outbox: OpenOutbox, make_record: MakeRecord, fields: dict[str, object], reason: str
) -> None:
    """The device never keeps what can never upload: it would only be quarantined by the cloud."""
    outbox = open_outbox()
    with pytest.raises(InvalidInput, match=reason):
        outbox.append(make_record(0)._replace(**fields)).result(timeout=10)
    assert outbox.append(make_record(1)).result(timeout=10) == 1  # the next record takes the next seq
    assert outbox.counters().produced_total == 1


def test_a_payload_past_the_per_record_limit_is_refused_at_append_and_on_the_writer(
    open_outbox: OpenOutbox, make_record: MakeRecord
) -> None:
    outbox = open_outbox(max_record_bytes=1000)
    with pytest.raises(RequestTooLarge, match="payload of 1001 bytes is past the limit of 1000 bytes per record"):
        outbox.append(make_record(0, size=1001))
    with pytest.raises(RequestTooLarge, match="payload of 5000 bytes"):
        outbox.append(make_record(1, payload=DeferredPayload(lambda: b"x", 5000)))
    # A deferred payload's size is an estimate: the encoded one is checked exactly, on the writer.
    understated = outbox.append(make_record(2, payload=DeferredPayload(lambda: b"x" * 1001, 10)))
    with pytest.raises(RequestTooLarge, match="payload of 1001 bytes"):
        understated.result(timeout=10)
    assert outbox.append(make_record(3, size=1000)).result(timeout=10) == 1
    assert outbox.counters().produced_total == 1


def test_a_bare_callable_payload_is_refused_as_its_size_is_unknown(
    open_outbox: OpenOutbox, make_record: MakeRecord
) -> None:
    outbox = open_outbox()
    for payload in (lambda: b"x", DeferredPayload(lambda: b"x", -1), bytearray(b"x"), "text"):
        with pytest.raises(InvalidInput, match="payload must be bytes or a DeferredPayload"):
            outbox.append(make_record(payload=payload))
    assert outbox.counters().pending == 0


def test_a_stalled_writer_makes_append_raise_overloaded_not_grow_memory(
    open_outbox: OpenOutbox, make_record: MakeRecord
) -> None:
    outbox = open_outbox(max_pending=50)
    stall, stuck = threading.Event(), threading.Event()

    def slow_disk() -> bytes:  # the writer calls this: it is stuck as on a stalled disk
        stuck.set()
        stall.wait(30)
        return b"x"

    first = outbox.append(make_record(payload=DeferredPayload(slow_disk, 1)))
    assert stuck.wait(10)
    queued = []
    with pytest.raises(Overloaded, match=r"append queue is full \(50 records") as caught:
        for i in range(1000):
            queued.append(outbox.append(make_record(i)))
    assert "disk is not keeping up" in str(caught.value)
    assert len(queued) == 50
    assert outbox.counters().refused_total == 1
    stall.set()
    assert first.result(timeout=10) == 1
    assert [f.result(timeout=10) for f in queued] == list(range(2, len(queued) + 2))
    assert outbox.append(make_record()).result(timeout=10) == len(queued) + 2


def _stalled(outbox: Outbox, make_record: MakeRecord) -> threading.Event:
    """Stall the writer on a deferred payload (as on a stalled disk); set the returned event to release it."""
    stall, stuck = threading.Event(), threading.Event()
    outbox.append(make_record(payload=DeferredPayload(lambda: stuck.set() or (stall.wait(30) and b"x"), 0)))
    assert stuck.wait(10)
    return stall


def test_the_queue_is_bounded_in_payload_bytes_too(open_outbox: OpenOutbox, make_record: MakeRecord) -> None:
    outbox = open_outbox(max_pending_bytes=10_000)
    stall = _stalled(outbox, make_record)
    with pytest.raises(Overloaded, match="10000 bytes"):
        for i in range(100):
            outbox.append(make_record(i, size=1000))
    stall.set()
    outbox.flush().result(timeout=10)


def test_deferred_payloads_count_their_declared_bytes_against_the_bound(
    open_outbox: OpenOutbox, make_record: MakeRecord
) -> None:
    """The outside report: closures counted 0 bytes, so ~12 GB of sampled CNN inputs could queue."""
    outbox = open_outbox(max_pending_bytes=1_000_000)
    stall = _stalled(outbox, make_record)
    input_bytes = 224 * 224 * 3 * 4  # a sampled CNN input: 602,112 bytes held by the closure
    queued = [outbox.append(make_record(0, payload=DeferredPayload(lambda: b"sample", input_bytes)))]
    with pytest.raises(Overloaded, match=r"append queue is full \(1 records, 602112 payload bytes waiting"):
        queued.append(outbox.append(make_record(1, payload=DeferredPayload(lambda: b"sample", input_bytes))))
    assert outbox.counters().refused_total == 1
    stall.set()
    assert [f.result(timeout=10) for f in queued] == [2]
    # The bytes are released once the writer took them: the queue takes the next one.
    assert outbox.append(make_record(2, payload=DeferredPayload(lambda: b"sample", input_bytes))).result(10) == 3


def test_close_commits_what_is_queued_then_refuses_appends(
    outbox_path: Path, open_outbox: OpenOutbox, make_record: MakeRecord
) -> None:
    outbox = open_outbox(commit_interval_s=0.01)
    futures = [outbox.append(make_record(i)) for i in range(500)]
    assert outbox.close(timeout=10)
    assert [f.result(timeout=0) for f in futures] == list(range(1, 501))
    with pytest.raises(ShuttingDown):
        outbox.append(make_record())
    with pytest.raises(ShuttingDown):
        outbox.ack(1)
    assert outbox.close(timeout=1)  # idempotent
    assert not Path(f"{outbox_path}-wal").exists() or Path(f"{outbox_path}-wal").stat().st_size == 0


def test_reopening_continues_after_last_seq_and_keeps_everything(
    outbox_path: Path, open_outbox: OpenOutbox, make_record: MakeRecord
) -> None:
    first = open_outbox()
    assert [first.append(make_record(i)).result(timeout=10) for i in range(5)] == [1, 2, 3, 4, 5]
    first.ack(2).result(timeout=10)
    first.close()

    second = open_outbox()
    c = second.counters()
    assert (c.last_seq, c.acked_seq, c.depth, c.produced_total, c.delivered_total) == (5, 2, 3, 5, 2)
    assert second.append(make_record(5)).result(timeout=10) == 6
    assert [seq for seq, _, _ in rows(outbox_path)] == [3, 4, 5, 6]


def test_a_second_writer_on_the_same_file_is_refused(open_outbox: OpenOutbox) -> None:
    open_outbox()
    with pytest.raises(OutboxUnusable, match="in use by another process"):
        open_outbox()


def test_a_file_from_a_newer_schema_is_refused(outbox_path: Path, open_outbox: OpenOutbox) -> None:
    open_outbox().close()
    conn = sqlite3.connect(outbox_path)
    conn.execute(f"PRAGMA user_version={SCHEMA_VERSION + 1}")
    conn.close()
    with pytest.raises(OutboxUnusable, match="newer edgefleet"):
        open_outbox()


def test_the_file_is_plain_sqlite_for_the_operator(
    outbox_path: Path, open_outbox: OpenOutbox, make_record: MakeRecord
) -> None:
    outbox = open_outbox()
    outbox.append(make_record(size=123)).result(timeout=10)
    db = sqlite_utils.Database(outbox_path)
    assert set(db.table_names()) == {"records", "counters", "quarantine"}
    assert db["records"].count == 1
    assert dict(db.execute("SELECT name, value FROM counters").fetchall())["last_seq"] == 1
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    assert db["records"].pks == ["seq"]


def test_open_rejects_nonsense_limits(outbox_path: Path) -> None:
    from edge_runtime.errors import ConfigError

    with pytest.raises(ConfigError, match="max_bytes"):
        Outbox.open(outbox_path, max_bytes=0, max_age_s=0)
    with pytest.raises(ConfigError, match="max_age_s"):
        Outbox.open(outbox_path, max_bytes=100, max_age_s=-1)


def test_close_reports_a_writer_that_does_not_stop_in_time(open_outbox: OpenOutbox, make_record: MakeRecord) -> None:
    outbox = open_outbox()
    stall, stuck = threading.Event(), threading.Event()
    first = outbox.append(make_record(payload=DeferredPayload(lambda: stuck.set() or (stall.wait(30) and b"x"), 1)))
    assert stuck.wait(10)
    with capture_logs() as logs:
        assert outbox.close(timeout=0.05) is False
    assert [e["event"] for e in logs] == ["outbox.close_timeout"]
    stall.set()
    assert first.result(timeout=10) == 1  # what was queued still commits
    assert outbox.close(timeout=10) is True


def test_flush_waits_for_every_append_queued_before_it(open_outbox: OpenOutbox, make_record: MakeRecord) -> None:
    outbox = open_outbox(max_group=10, commit_interval_s=0.01)
    futures = [outbox.append(make_record(i)) for i in range(95)]  # ten groups
    outbox.flush().result(timeout=10)
    assert all(f.done() for f in futures)
    assert outbox.counters().last_seq == 95
