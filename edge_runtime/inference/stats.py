"""Per-model-version statistics: Triton's ModelStatistics counters plus latency and batch histograms.

The batcher reports each executed batch and each rejected request here (this is its BatchObserver);
observability/metrics.py exports the same numbers to Prometheus at scrape time.
"""

from __future__ import annotations

import bisect
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

__all__ = ["BATCH_BUCKETS", "LATENCY_BUCKETS", "Duration", "ModelStats", "StatsSnapshot"]

# Request latency histogram bounds (seconds): 100 µs .. 10 s, dense where edge latency SLOs sit.
LATENCY_BUCKETS = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    10.0,
)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


@dataclass
class Duration:
    count: int = 0
    ns: int = 0

    def add(self, seconds: float, n: int = 1) -> None:
        self.count += n
        self.ns += int(seconds * 1e9)


@dataclass
class StatsSnapshot:
    success: Duration = field(default_factory=Duration)
    fail: Duration = field(default_factory=Duration)
    queue: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    inference_count: int = 0
    execution_count: int = 0
    last_inference_ms: int = 0
    # batch size (rows) -> executions of that size and their engine time
    batches: dict[int, Duration] = field(default_factory=dict)
    failures: dict[str, int] = field(default_factory=dict)
    # Non-cumulative counts per bucket of LATENCY_BUCKETS / BATCH_BUCKETS, the last one for +Inf.
    latency_buckets: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BUCKETS) + 1))
    latency_sum_s: float = 0.0
    batch_buckets: list[int] = field(default_factory=lambda: [0] * (len(BATCH_BUCKETS) + 1))

    def copy(self) -> StatsSnapshot:
        return StatsSnapshot(
            success=Duration(self.success.count, self.success.ns),
            fail=Duration(self.fail.count, self.fail.ns),
            queue=Duration(self.queue.count, self.queue.ns),
            compute_infer=Duration(self.compute_infer.count, self.compute_infer.ns),
            inference_count=self.inference_count,
            execution_count=self.execution_count,
            last_inference_ms=self.last_inference_ms,
            batches={k: Duration(v.count, v.ns) for k, v in self.batches.items()},
            failures=dict(self.failures),
            latency_buckets=list(self.latency_buckets),
            latency_sum_s=self.latency_sum_s,
            batch_buckets=list(self.batch_buckets),
        )


class ModelStats:
    """Thread-safe counters for one model version: one lock and a few additions per batch."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._s = StatsSnapshot()

    def on_batch(self, rows: int, requests: int, queue_s: Sequence[float], compute_s: float, ok: bool) -> None:
        queued = sum(queue_s)
        with self._lock:
            s = self._s
            s.queue.add(queued, requests)
            s.execution_count += 1
            s.last_inference_ms = int(time.time() * 1000)
            s.batch_buckets[bisect.bisect_left(BATCH_BUCKETS, rows)] += 1
            if not ok:
                s.fail.add(queued + compute_s * requests, requests)
                s.failures["engine"] = s.failures.get("engine", 0) + requests
                return
            s.success.add(queued + compute_s * requests, requests)
            s.compute_infer.add(compute_s * requests, requests)
            s.inference_count += rows
            batch = s.batches.get(rows)
            if batch is None:
                batch = s.batches[rows] = Duration()
            batch.add(compute_s)
            for q in queue_s:
                latency = q + compute_s
                s.latency_buckets[bisect.bisect_left(LATENCY_BUCKETS, latency)] += 1
                s.latency_sum_s += latency

    def on_rejected(self, reason: str) -> None:
        with self._lock:
            self._s.fail.count += 1
            self._s.failures[reason] = self._s.failures.get(reason, 0) + 1

    def snapshot(self) -> StatsSnapshot:
        with self._lock:
            return self._s.copy()
