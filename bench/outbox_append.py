"""Outbox append throughput against raw sqlite3 executemany on the same schema and pragmas.

Ours: `Outbox.append` from one thread in a tight loop, 200-byte payloads, waiting only for the last future
(the writer checks, checksums and group-commits). Raw: `executemany` of 1000 rows per transaction on a
connection with the same pragmas (WAL, synchronous=FULL) into the same schema (made by the outbox's own
migrations), with a constant checksum. Both start from an empty file each repetition, interleaved. Target:
ours >= 0.3x raw. Also reported: appends where every caller waits for its record to be durable (1 thread; 16
threads sharing group commits).
"""

from __future__ import annotations

import importlib.metadata
import os
import sqlite3
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench._harness import Options, Report, Target, interleaved, median
from edge_runtime.outbox import Outbox, OutboxRecord
from edge_runtime.outbox._schema import connect, migrate
from edgefleet.heap import freeze_startup_heap
from edgefleet.proto.edgefleet.v1 import results_pb2

__all__ = ["run"]

RATIO_LIMIT = 0.3
PAYLOAD = os.urandom(200)
ROWS_PER_TXN = 1000
INSERT = (
    "INSERT INTO records (seq, created_at_ms, model, version, priority, kind, payload_type, payload, "
    "request_id, size, checksum) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 0)"
)
KIND = results_pb2.RECORD_KIND_RESULT
TYPE = "inference.ModelInferResponse"


def _fresh(directory: Path) -> Path:
    path = directory / f"outbox-{time.monotonic_ns()}.db"
    return path


def _remove(path: Path) -> None:
    for suffix in ("", "-wal", "-shm", ".lock"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)


def _open(path: Path) -> Outbox:
    return Outbox.open(path, max_bytes=1 << 40, max_age_s=0)  # the defaults, as the agent opens it


def ours_fire_and_forget(directory: Path, n: int) -> float:
    """records/s: one thread appends n records, then waits for the last future only."""
    path = _fresh(directory)
    outbox = _open(path)
    try:
        append = outbox.append
        start = time.perf_counter()
        now = time.time_ns() // 1_000_000
        future = None
        for i in range(n):
            future = append(OutboxRecord(now + i, "digits", 1, 1, KIND, TYPE, PAYLOAD, "req"))
        assert future is not None and future.result(timeout=600) == n
        return n / (time.perf_counter() - start)
    finally:
        outbox.close()
        _remove(path)


def raw_executemany(directory: Path, n: int) -> float:
    """records/s: rows built in the loop, executemany of 1000 per transaction, same pragmas and schema."""
    path = _fresh(directory)
    conn = connect(path)
    migrate(conn, path)
    try:
        start = time.perf_counter()
        now = time.time_ns() // 1_000_000
        for first in range(0, n, ROWS_PER_TXN):
            rows = [
                (seq, now + seq, "digits", 1, 1, KIND, TYPE, PAYLOAD, "req", len(PAYLOAD))
                for seq in range(first + 1, min(first + ROWS_PER_TXN, n) + 1)
            ]
            conn.execute("BEGIN IMMEDIATE")
            conn.executemany(INSERT, rows)
            conn.execute("COMMIT")
        return n / (time.perf_counter() - start)
    finally:
        conn.close()
        _remove(path)


def ours_durable(directory: Path, threads: int, per_thread: int) -> dict[str, float]:
    """Every caller waits for its own record to be durable before appending the next."""
    path = _fresh(directory)
    outbox = _open(path)
    latencies: list[float] = []
    lock = threading.Lock()

    def caller() -> None:
        mine = []
        for _ in range(per_thread):
            t0 = time.perf_counter()
            outbox.append(OutboxRecord(time.time_ns() // 1_000_000, "digits", 1, 1, KIND, TYPE, PAYLOAD)).result(60)
            mine.append(time.perf_counter() - t0)
        with lock:
            latencies.extend(mine)

    try:
        workers = [threading.Thread(target=caller) for _ in range(threads)]
        start = time.perf_counter()
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        elapsed = time.perf_counter() - start
    finally:
        outbox.close()
        _remove(path)
    return {"records_per_s": threads * per_thread / elapsed, "p50_ms": median(latencies) * 1e3}


def run(options: Options) -> Report:
    # One burst as large as the append queue's default bound (max_pending), so the loop never meets
    # Overloaded and waits for nothing but the last future; several bursts per repetition.
    n = options.count(20_000, 5_000)
    bursts = options.count(3, 1)
    durable_per_thread = options.count(200, 10)
    report = Report(
        "outbox_append",
        options,
        {
            "records": n,
            "payload_bytes": len(PAYLOAD),
            "bursts_per_repetition": bursts,
            "ours": "Outbox.append in a loop on one thread, waiting for the last future only "
            "(Outbox.open defaults: commit_interval 2 ms, max_group 1000, max_pending 20000)",
            "raw_baseline": f"sqlite3 executemany, {ROWS_PER_TXN} rows per transaction, WAL + synchronous=FULL, "
            "same schema (two indexes), a constant checksum",
            "durable": f"every caller waits for its record: 1 and 16 threads x {durable_per_thread} appends",
            "statistic": "median over interleaved repetitions of the median burst, each burst on a fresh file",
            "sqlite": sqlite3.sqlite_version,
            "sqlite_utils": importlib.metadata.version("sqlite-utils"),
        },
    )
    # As `edge-agent run` does before serving: the imports' long-lived objects leave the cyclic GC, whose
    # full collections otherwise walk them again and again while thousands of appends are pending.
    report.params["gc_frozen_objects"] = freeze_startup_heap()
    with tempfile.TemporaryDirectory(prefix="efb-outbox-") as tmp:
        directory = Path(tmp)
        ours_fire_and_forget(directory, min(n, 5000))  # warm-up: imports, page cache
        runs: dict[str, Callable[[], Any]] = {
            "ours": lambda: median([ours_fire_and_forget(directory, n) for _ in range(bursts)]),
            "raw": lambda: median([raw_executemany(directory, n) for _ in range(bursts)]),
        }
        throughput = interleaved(options.repeat, runs)
        durable = interleaved(
            options.repeat,
            {
                "1_thread": lambda: ours_durable(directory, 1, durable_per_thread),
                "16_threads": lambda: ours_durable(directory, 16, durable_per_thread),
            },
        )
    ours, raw = median(throughput["ours"]), median(throughput["raw"])
    report.measurements = {
        "ours_records_per_s": throughput["ours"],
        "raw_records_per_s": throughput["raw"],
        "durable": durable,
    }
    report.say(f"append throughput: ours {ours:,.0f} records/s, raw executemany {raw:,.0f} records/s")
    for name, values in durable.items():
        rate = median([v["records_per_s"] for v in values])
        p50 = median([v["p50_ms"] for v in values])
        report.say(f"durable appends, {name.replace('_', ' ')}: {rate:,.0f} records/s, p50 {p50:.2f} ms")
    ratio = report.ratio("append_throughput", ours, raw, "append throughput")
    report.target(
        Target(
            "outbox append throughput / raw executemany",
            ratio,
            RATIO_LIMIT,
            "x",
            "higher",
            how="median records/s of each over interleaved repetitions, each on a fresh file",
            reason="per record the writer adds a Future (create + resolve), a queue hand-off between two "
            "threads under the GIL, the record checks and its CRC-32 checksum (~0.5 us)",
        )
    )
    return report


if __name__ == "__main__":  # python -m bench.outbox_append [--quick]
    from edgefleet.logs import configure_logging

    configure_logging("warning", sys.stderr)
    quick = "--quick" in sys.argv
    run(Options(Path("build/models"), repeat=1 if quick else 5, quick=quick)).write()
