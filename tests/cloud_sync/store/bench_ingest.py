"""Micro-benchmark of ResultStore.ingest (run by hand, not a test): records/s for 1000-record batches.

    .venv/bin/python -m tests.cloud_sync.store.bench_ingest [--reps 5] [--batches 50] [--json out.json]

For each engine it times, in the same run: the driver alone (executemany of the same rows into the same
table, one commit per batch: the floor), ingest from one thread, and ingest from 8 threads for 8 devices.
Batches are parsed protobuf messages (as the gRPC servicer hands them over), their records checksummed as
current agents send them (ingest verifies each); parsing is not timed.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sqlite3
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from importlib import metadata as package_metadata
from pathlib import Path

import psycopg
import sqlalchemy as sa

from bench._harness import machine_info
from cloud_sync.store import DeviceRegistry, ResultStore, open_database
from cloud_sync.store.batches import ROW_COLUMNS, IngestLimits, record_checksum, validate_batch
from edgefleet.proto.edgefleet.v1 import results_pb2
from tests.postgres import POSTGRES_CONNINFO, POSTGRES_URL, postgres_unreachable

BATCH = 1000
PAYLOAD = bytes(range(200))  # about an inference result for a small classifier
THREADS = 8


def make_batches(count: int) -> list[results_pb2.ResultBatch]:
    out = []
    for k in range(count):
        batch = results_pb2.ResultBatch(
            after_seq=k * BATCH,
            through_seq=(k + 1) * BATCH,
            produced_total=(k + 1) * BATCH,
            record_checksum=results_pb2.RECORD_CHECKSUM_CRC32,  # as current agents send them: checked at ingest
        )
        for seq in range(k * BATCH + 1, (k + 1) * BATCH + 1):
            record = batch.records.add(
                seq=seq,
                created_at_ms=1_700_000_000_000 + seq,
                model="digits",
                version=2,
                priority=1,
                kind=results_pb2.RECORD_KIND_RESULT,
                payload_type="inference.ModelInferResponse",
                payload=PAYLOAD,
                request_id=f"req-{seq:012d}",
            )
            record.checksum = record_checksum(record)
        out.append(results_pb2.ResultBatch.FromString(batch.SerializeToString()))
    return out


def rate(records: int, run: Callable[[], None]) -> float:
    started = time.perf_counter()
    run()
    return records / (time.perf_counter() - started)


def driver_floor(url: str, backend: str, batches: list[results_pb2.ResultBatch]) -> float:
    """The same rows through the bare driver, into the store's own table, one commit per batch."""
    db = open_database(url)
    db.close()
    rows = [validate_batch("floor", batch, IngestLimits(), time.time_ns() // 1_000_000).rows for batch in batches]
    columns = ", ".join(ROW_COLUMNS)
    if backend == "sqlite":
        conn = sqlite3.connect(sa.make_url(url).database or "", isolation_level=None)
        conn.execute("PRAGMA synchronous=FULL")
        sql = f"INSERT INTO results ({columns}) VALUES ({', '.join('?' * len(ROW_COLUMNS))}) ON CONFLICT DO NOTHING"

        def run() -> None:
            for chunk in rows:
                conn.execute("BEGIN IMMEDIATE")
                conn.executemany(sql, chunk)
                conn.execute("COMMIT")

        try:
            return rate(BATCH * len(batches), run)
        finally:
            conn.close()
    schema = sa.make_url(url).query["options"].split("=", 1)[1]
    with psycopg.connect(POSTGRES_CONNINFO, options=f"-csearch_path={schema}") as pg:
        sql = f"INSERT INTO results ({columns}) VALUES ({', '.join(['%s'] * len(ROW_COLUMNS))}) ON CONFLICT DO NOTHING"

        def run_pg() -> None:
            for chunk in rows:
                with pg.cursor() as cursor:
                    cursor.executemany(sql, chunk)
                pg.commit()

        return rate(BATCH * len(batches), run_pg)


def ingest_rate(url: str, batches: list[results_pb2.ResultBatch], threads: int) -> float:
    db = open_database(url)
    try:
        registry, store = DeviceRegistry(db), ResultStore(db)
        devices = [f"bench-{i}" for i in range(threads)]
        for device_id in devices:
            registry.add_device(device_id)

        def upload(device_id: str) -> None:
            for batch in batches:
                store.ingest(device_id, batch)

        def run() -> None:
            with ThreadPoolExecutor(threads) as pool:
                list(pool.map(upload, devices))

        return rate(BATCH * len(batches) * threads, run)
    finally:
        db.close()


def fresh_url(backend: str, workdir: Path) -> tuple[str, Callable[[], None]]:
    if backend == "sqlite":
        path = workdir / f"{uuid.uuid4().hex}.db"
        return f"sqlite:///{path}", lambda: [p.unlink(missing_ok=True) for p in workdir.glob(f"{path.name}*")]
    schema = f"bench_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(POSTGRES_CONNINFO, autocommit=True) as conn:
        conn.execute(f'CREATE SCHEMA "{schema}"')

    def drop() -> None:
        with psycopg.connect(POSTGRES_CONNINFO, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA "{schema}" CASCADE')

    url = sa.make_url(POSTGRES_URL).update_query_dict({"options": f"-csearch_path={schema}"})
    return url.render_as_string(hide_password=False), drop


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--batches", type=int, default=50, help="batches per run (and per thread)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)

    batches = make_batches(args.batches)
    backends = ["sqlite"] + ([] if postgres_unreachable() else ["postgresql"])
    measurements: dict[str, dict[str, list[float]]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-ingest-") as tmp:
        for backend in backends:
            runs: dict[str, list[float]] = {"driver_floor": [], "ingest_1_thread": [], f"ingest_{THREADS}_threads": []}
            for _ in range(args.reps):
                for name, measure in (
                    ("driver_floor", lambda url, b=backend: driver_floor(url, b, batches)),
                    ("ingest_1_thread", lambda url: ingest_rate(url, batches, 1)),
                    (f"ingest_{THREADS}_threads", lambda url: ingest_rate(url, batches, THREADS)),
                ):
                    url, cleanup = fresh_url(backend, Path(tmp))
                    try:
                        runs[name].append(measure(url))
                    finally:
                        cleanup()
            measurements[backend] = runs

    result = {
        "benchmark": "cloud_store_ingest",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {**machine_info(), "load_average_1m": os.getloadavg()[0]},
        "versions": {
            "sqlalchemy": sa.__version__,
            "psycopg": psycopg.__version__,
            "sqlite": sqlite3.sqlite_version,
            "protobuf": package_metadata.version("protobuf"),
        },
        "params": {"records_per_batch": BATCH, "payload_bytes": len(PAYLOAD), "batches": args.batches},
        "repetitions": args.reps,
        "records_per_s": {
            backend: {name: {"median": statistics.median(values), "runs": values} for name, values in runs.items()}
            for backend, runs in measurements.items()
        },
    }
    for backend, runs in measurements.items():
        floor = statistics.median(runs["driver_floor"])
        for name, values in runs.items():
            median = statistics.median(values)
            print(f"{backend:10s} {name:18s} {median:>10,.0f} records/s  ({median / floor:.2f}x the driver floor)")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
