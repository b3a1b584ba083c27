"""Micro-benchmark of the samples reads (run by hand, not a test): list, reason filter, export, calibration.

    .venv/bin/python -m tests.cloud_sync.samples.bench_samples [--samples 10000] [--others 30000] [--postgres]

Stores `samples` digits samples (random [1,1,28,28] float32 in, [1,10] out; every 10th "uncertain") among
`others` plain results of the same model, through ResultStore.ingest, in a SQLite file (or a PostgreSQL schema
of the test server). Prints medians of 3.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from cloud_sync.samples_export import export_file
from cloud_sync.store import DeviceRegistry, ResultStore, open_database
from cloud_sync.store.samples import SampleQuery, SampleStore
from edgefleet.proto.edgefleet.v1 import results_pb2
from tests.cloud_sync.samples.conftest import Fleet, probabilities, sampled
from tests.postgres import postgres_schema_url


def _median(fn: Callable[[], Any], reps: int = 3) -> float:
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--samples", type=int, default=10_000)
    parser.add_argument("--others", type=int, default=30_000)
    parser.add_argument("--postgres", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        url = stack.enter_context(postgres_schema_url()) if args.postgres else f"sqlite:///{Path(tmp) / 'cloud.db'}"
        db = open_database(url)
        rng = np.random.default_rng(1)
        fleet = Fleet(db, ResultStore(db), DeviceRegistry(db))
        payloads = [
            sampled(
                {"x": rng.random((1, 1, 28, 28), np.float32)},
                {"probabilities": probabilities(i % 10)},
                reason="uncertain" if i % 10 == 0 else "",
            )
            for i in range(1000)
        ]
        others_per_chunk = args.others * 1000 // max(args.samples, 1)
        for _ in range(args.samples // 1000):
            fleet.upload("cam-1", payloads)
            if others_per_chunk:
                fleet.upload(
                    "cam-1",
                    [b"r" * 64] * others_per_chunk,
                    kind=results_pb2.RECORD_KIND_RESULT,
                    payload_type="inference.ModelInferResponse",
                )
        store = SampleStore(db)

        def walk(query: SampleQuery, limit: int) -> int:
            after, count = 0, 0
            while True:
                page = store.page(query, after, limit)
                count += len(page.samples)
                after = page.next_after_id
                if not page.more:
                    return count

        page = store.page(SampleQuery("digits"), 0, args.samples)
        figures = {
            "engine": db.backend,
            "samples": args.samples,
            "other_results": args.others,
            "list_all_pages_of_1000_s": _median(lambda: walk(SampleQuery("digits"), 1000)),
            "list_reason_uncertain_all_s": _median(lambda: walk(SampleQuery("digits", reason="uncertain"), 1000)),
            "list_first_page_100_s": _median(lambda: store.page(SampleQuery("digits"), 0, 100)),
            "read_10000_for_export_s": _median(lambda: store.page(SampleQuery("digits"), 0, args.samples)),
            "export_npz_encode_s": _median(lambda: export_file(page.samples, {}, "npz")),
            "export_parquet_encode_s": _median(lambda: export_file(page.samples, {}, "parquet")),
            "npz_bytes": len(export_file(page.samples, {}, "npz").content),
            "parquet_bytes": len(export_file(page.samples, {}, "parquet").content),
            "calibration_1000_s": _median(lambda: store.calibration("digits", None, 1000)),
        }
        db.close()
    print(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
