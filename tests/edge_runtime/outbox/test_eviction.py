"""Eviction: the accounting identity, in-doubt records spared, priority then age order, live limits, logs."""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from structlog.testing import capture_logs

from edge_runtime.outbox import Outbox, OutboxRecord
from edge_runtime.outbox._policy import eviction_goal, record_bytes
from tests.edge_runtime.outbox.conftest import MakeRecord, OpenOutbox, rows
from tests.waiting import wait_for

NOW_MS = time.time_ns() // 1_000_000
OLD_MS = NOW_MS - 10**10  # ~116 days ago: expired under the tests' 1-day age limit
DAY_S = 86_400.0


def test_set_limits_to_a_smaller_bound_evicts_right_away_with_one_log_line(
    open_outbox: OpenOutbox, make_record: MakeRecord
) -> None:
    outbox = open_outbox()
    futures = [outbox.append(make_record(i, size=500)) for i in range(200)]
    for f in futures:
        f.result(timeout=10)
    before = outbox.counters().bytes
    with capture_logs() as logs:
        outbox.set_limits(max_bytes=before // 4, max_age_s=0).result(timeout=10)
    after = outbox.counters()
    assert after.bytes <= before // 4
    assert after.evicted_total == 200 - after.depth > 0
    evicted = [e for e in logs if e["event"] == "outbox.evicted"]
    assert evicted == [
        {
            "event": "outbox.evicted",
            "log_level": "info",
            "records": after.evicted_total,
            "bytes": before - after.bytes,
            "reason": "max_bytes",
        }
    ]
    assert [seq for seq, _, _ in rows(outbox.path)] == list(range(after.evicted_total + 1, 201))  # oldest went


def test_records_past_max_age_are_evicted_and_counted(open_outbox: OpenOutbox, make_record: MakeRecord) -> None:
    outbox = open_outbox(max_age_s=DAY_S)
    with capture_logs() as logs:
        old = [outbox.append(make_record(i, created_at_ms=OLD_MS + i)).result(timeout=10) for i in range(3)]
        fresh = outbox.append(make_record(3)).result(timeout=10)
        outbox.flush().result(timeout=10)
    assert [seq for seq, _, _ in rows(outbox.path)] == [fresh]
    c = outbox.counters()
    assert (c.evicted_total, c.depth, c.oldest_created_at_ms is not None) == (len(old), 1, True)
    assert sum(e["records"] for e in logs if e["event"] == "outbox.evicted" and e["reason"] == "max_age") == 3


def test_age_eviction_runs_on_an_idle_outbox_when_the_limit_drops(
    open_outbox: OpenOutbox, make_record: MakeRecord
) -> None:
    outbox = open_outbox()
    outbox.append(make_record(created_at_ms=OLD_MS)).result(timeout=10)
    assert outbox.counters().depth == 1
    outbox.set_limits(max_bytes=1 << 40, max_age_s=DAY_S).result(timeout=10)
    assert outbox.counters().depth == 0


def test_a_record_that_expires_while_the_outbox_is_idle_is_evicted_then(
    open_outbox: OpenOutbox, make_record: MakeRecord
) -> None:
    outbox = open_outbox(max_age_s=1.0)
    outbox.append(make_record()).result(timeout=10)
    assert outbox.counters().depth == 1  # not expired yet; nothing else will wake the writer
    wait_for(lambda: outbox.counters().evicted_total == 1, timeout=10, what="age eviction on an idle outbox")
    assert outbox.counters().depth == 0


def test_oldest_created_at_follows_deletes(open_outbox: OpenOutbox, make_record: MakeRecord) -> None:
    outbox = open_outbox()
    for i in range(3):
        outbox.append(make_record(i, created_at_ms=1000 + i)).result(timeout=10)
    assert outbox.counters().oldest_created_at_ms == 1000
    outbox.ack(2).result(timeout=10)
    assert outbox.counters().oldest_created_at_ms == 1002


# -- the property test: a model of the policy, checked against the real file after every step --------------


@dataclass
class Model:
    max_bytes: int
    max_age_s: float = 0.0
    records: dict[int, tuple[int, int, int]] = field(default_factory=dict)  # seq -> (priority, created, bytes)
    last_seq: int = 0
    acked: int = 0
    in_doubt: int = 0
    produced: int = 0
    evicted: int = 0
    delivered: int = 0
    ever_in_doubt: set[int] = field(default_factory=set)

    @property
    def held_bytes(self) -> int:
        return sum(b for _, _, b in self.records.values())

    def evict(self) -> None:
        """The policy as DESIGN.md states it: expired first, then lowest priority, then oldest; never in doubt."""
        if self.max_age_s:
            cutoff = NOW_MS - self.max_age_s * 1000
            for seq in [s for s, (_, created, _) in self.records.items() if created < cutoff and s > self.in_doubt]:
                del self.records[seq]
                self.evicted += 1
        goal = eviction_goal(self.held_bytes, self.max_bytes)
        for seq in sorted((s for s in self.records if s > self.in_doubt), key=lambda s: (self.records[s][0], s)):
            if goal <= 0:
                break
            goal -= self.records.pop(seq)[2]
            self.evicted += 1


sizes = st.integers(0, 3000) | st.integers(800, 3000)  # hypothesis favours tiny ints; evictions need bulk
appends = st.tuples(st.just("append"), sizes, st.integers(0, 3), st.booleans())
uploads = st.tuples(st.just("upload"), st.integers(1, 8))
acks = st.tuples(st.just("ack"), st.integers(0, 100))
limits = st.tuples(st.just("limits"), st.sampled_from([3000, 8000, 20_000, 1 << 40]), st.sampled_from([0.0, DAY_S]))
operations = st.lists(appends | (uploads | acks | limits), min_size=8, max_size=40)  # half appends


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=operations, start_bytes=st.sampled_from([3000, 6000, 12_000]))
def test_eviction_accounting_holds_over_any_sequence(ops: list[tuple[object, ...]], start_bytes: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "outbox.db"
        outbox = Outbox.open(path, max_bytes=start_bytes, max_age_s=0, commit_interval_s=0)
        model = Model(max_bytes=start_bytes)
        try:
            run_against_model(outbox, model, ops)  # checks the outbox against the model after every step
            c = outbox.counters()
            assert c.produced_total == c.depth + c.evicted_total + c.delivered_total == model.produced
        finally:
            outbox.close()


def run_against_model(outbox: Outbox, model: Model, ops: list[tuple[object, ...]]) -> None:
    sent: list[int] = []  # through_seqs of batches sent, for acks
    for op in ops:
        kind = op[0]
        if kind == "append":
            _, size, priority, old = op
            assert isinstance(size, int) and isinstance(priority, int)
            created = OLD_MS if old else NOW_MS
            seq = outbox.append(_record(size, priority, created)).result(timeout=10)
            assert seq == model.last_seq + 1
            model.last_seq = seq
            model.produced += 1
            model.records[seq] = (priority, created, record_bytes(size, "m", "t", f"r{size}"))
        elif kind == "upload":
            (_, n) = op
            assert isinstance(n, int)
            batch = outbox.next_batch(n, 1 << 30)
            expected = sorted(model.records)[:n]
            assert [r.seq for r in batch.records] == expected
            cut = len(model.records) > n
            assert batch.after_seq == model.acked
            assert batch.through_seq == (expected[-1] if cut else model.last_seq)
            if not batch.empty:
                model.in_doubt = max(model.in_doubt, batch.through_seq)
                model.ever_in_doubt.update(s for s in model.records if s <= batch.through_seq)
                sent.append(batch.through_seq)
        elif kind == "ack":
            (_, pick) = op
            assert isinstance(pick, int)
            if not sent:
                continue
            seq = sent[pick % len(sent)]
            assert outbox.ack(seq).result(timeout=10) == max(seq, model.acked)
            if seq > model.acked:
                for s in [s for s in model.records if s <= seq]:
                    del model.records[s]
                    model.delivered += 1
                model.acked = seq
                model.in_doubt = max(model.in_doubt, seq)
        else:
            _, max_bytes, max_age_s = op
            assert isinstance(max_bytes, int) and isinstance(max_age_s, float)
            outbox.set_limits(max_bytes, max_age_s).result(timeout=10)
            model.max_bytes, model.max_age_s = max_bytes, max_age_s
        model.evict()
        outbox.flush().result(timeout=10)  # the writer's eviction after the step has run
        check(outbox, model)
    event(
        f"evicted {'some' if model.evicted else 'none'}, in doubt {'some' if model.in_doubt > model.acked else 'none'}"
    )


def check(outbox: Outbox, model: Model) -> None:
    held = {seq: size for seq, _, size in rows(outbox.path)}
    c = outbox.counters()
    assert sorted(held) == sorted(model.records)
    assert c.produced_total == c.depth + c.evicted_total + c.delivered_total
    assert (c.produced_total, c.evicted_total, c.delivered_total) == (model.produced, model.evicted, model.delivered)
    assert (c.depth, c.bytes) == (len(held), model.held_bytes)
    assert (c.acked_seq, c.in_doubt_seq, c.last_seq) == (model.acked, model.in_doubt, model.last_seq)
    # Never evicts a record in doubt: each one sent is still held until an ack covers it.
    assert all(seq in held for seq in model.ever_in_doubt if seq > c.acked_seq)
    in_doubt_bytes = sum(b for s, (_, _, b) in model.records.items() if s <= c.in_doubt_seq)
    assert c.bytes <= model.max_bytes + in_doubt_bytes
    counted = dict(rows(outbox.path, "SELECT name, value FROM counters"))
    assert (counted["depth"], counted["bytes"], counted["evicted_total"]) == (c.depth, c.bytes, c.evicted_total)


def _record(size: int, priority: int, created: int) -> OutboxRecord:
    return OutboxRecord(created, "m", 1, priority, 1, "t", b"p" * size, f"r{size}")
