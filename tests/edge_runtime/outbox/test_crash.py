"""kill -9 at random moments: every seq a child saw committed survives, whole, and the file stays sound."""

from __future__ import annotations

import os
import random
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from edge_runtime.outbox import Outbox, OutboxRecord
from tests.edge_runtime.outbox._appender import payload_for

CHILD = Path(__file__).with_name("_appender.py")
REPO_ROOT = Path(__file__).resolve().parents[3]
KILLS = 6


def run_child_and_kill(path: Path, run: int, lines_before_kill: int) -> list[tuple[int, int, int]]:
    """Start an appender, SIGKILL it once it reported that many seqs; every (seq, run, i) it reported."""
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    child = subprocess.Popen(
        [sys.executable, str(CHILD), str(path), str(run)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    assert child.stdout is not None and child.stderr is not None
    head = b""
    for _ in range(lines_before_kill):
        line = child.stdout.readline()
        if not line:
            pytest.fail(f"appender run {run} exited early: {child.stderr.read().decode()[-2000:]}")
        head += line
    child.send_signal(signal.SIGKILL)
    tail = child.stdout.read()  # what it printed before the signal landed counts too
    child.wait(timeout=10)
    child.stdout.close()
    child.stderr.close()
    assert child.returncode == -signal.SIGKILL
    return _parse(head + tail)


def _parse(text: bytes) -> list[tuple[int, int, int]]:
    reported = []
    for line in text.split(b"\n")[:-1]:  # the last piece has no newline: possibly cut mid-line
        seq, run, i = (int(x) for x in line.split())
        reported.append((seq, run, i))
    return reported


@pytest.mark.slow
def test_kill_9_at_random_moments_loses_nothing_committed(tmp_path: Path) -> None:
    path = tmp_path / "outbox.db"
    rng = random.Random(int.from_bytes(os.urandom(4), "big"))
    reported: list[tuple[int, int, int]] = []
    for run in range(KILLS):
        # 0: killed while still starting (opening, migrating or recovering the file), else mid-stream.
        lines = 0 if run == 1 else rng.randint(1, 400)
        reported += run_child_and_kill(path, run, lines)

    with Outbox.open(path, max_bytes=1 << 40, max_age_s=0) as outbox:  # opens after the last kill too
        last = outbox.counters().last_seq
        assert outbox.append(_one()).result(timeout=10) == last + 1

    conn = sqlite3.connect(path)
    try:
        assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        stored = {
            seq: (payload, size, req)
            for seq, payload, size, req in conn.execute("SELECT seq, payload, size, request_id FROM records")
        }
        counters = dict(conn.execute("SELECT name, value FROM counters"))
    finally:
        conn.close()
    assert reported, "no child got as far as a commit"
    for seq, run, i in reported:
        payload, size, request_id = stored[seq]
        assert (payload, size, request_id) == (payload_for(run, i), len(payload_for(run, i)), f"{run}:{i}")
    assert all(len(payload) == size for payload, size, _ in stored.values())  # no partial record
    seqs = [seq for seq, _, _ in reported]
    assert len(set(seqs)) == len(seqs)
    for run in range(KILLS):  # within a run seqs follow append order; each run continues after the last
        mine = [(i, seq) for seq, r, i in reported if r == run]
        assert [seq for _, seq in sorted(mine)] == sorted(seq for _, seq in mine)
    assert counters["depth"] == len(stored) and counters["last_seq"] == max(stored)
    assert counters["produced_total"] == len(stored)


def _one() -> OutboxRecord:
    return OutboxRecord(1, "digits", 1, 1, 1, "t", b"after", "after")
