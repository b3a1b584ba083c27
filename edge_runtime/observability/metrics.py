"""Prometheus metrics of the agent, named after Triton's (`nv_inference_*` -> `edgefleet_inference_*`).

Per-model figures are not Prometheus objects on the hot path: each model version keeps plain counters in
its ModelStats (one lock per batch) and this collector reads them at scrape time, as Triton exports its
own statistics. Measured: nine prometheus_client updates per request cost more than the digits model's
whole inference. One registry per agent; tests build their own.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Protocol

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from edge_runtime.inference.stats import BATCH_BUCKETS, LATENCY_BUCKETS, StatsSnapshot

__all__ = ["AgentMetrics", "ModelSample", "OutboxFigures"]

_LABELS = ["model", "version"]


@dataclass(frozen=True)
class ModelSample:
    """Everything exported for one model version at one scrape."""

    name: str
    version: str
    stats: StatsSnapshot
    pending: int
    plan_batch_size: int
    profile: tuple[tuple[int, float], ...]  # (batch size, inferences/s)
    ready: bool


class OutboxFigures(Protocol):
    """The outbox's counters as exported (edge_runtime.outbox.OutboxCounters)."""

    @property
    def depth(self) -> int: ...
    @property
    def bytes(self) -> int: ...
    @property
    def produced_total(self) -> int: ...
    @property
    def delivered_total(self) -> int: ...
    @property
    def evicted_total(self) -> int: ...
    @property
    def rejected_total(self) -> int: ...
    @property
    def quarantined(self) -> int: ...
    @property
    def acked_seq(self) -> int: ...
    @property
    def oldest_created_at_ms(self) -> int | None: ...


class AgentMetrics:
    """The agent's registry, with a collector over every tracked model version and the outbox."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self._sources: dict[tuple[str, int], Callable[[], ModelSample]] = {}
        self._lock = threading.Lock()
        self.registry.register(_ModelCollector(self))

    def track_outbox(self, counters: Callable[[], OutboxFigures]) -> None:
        """Export the outbox's ledger (read at scrape time: no work on the append path)."""
        self.registry.register(_OutboxCollector(counters))

    def track(self, name: str, version: int, sample: Callable[[], ModelSample]) -> None:
        with self._lock:
            self._sources[(name, version)] = sample

    def untrack(self, name: str, version: int) -> None:
        with self._lock:
            self._sources.pop((name, version), None)

    def samples(self) -> list[ModelSample]:
        with self._lock:
            sources = list(self._sources.values())
        return [source() for source in sources]


def _histogram(
    name: str,
    doc: str,
    samples: list[ModelSample],
    bounds: tuple[float, ...],
    pick: Callable[[StatsSnapshot], tuple[list[int], float]],
) -> HistogramMetricFamily:
    family = HistogramMetricFamily(name, doc, labels=_LABELS)
    for s in samples:
        counts, total = pick(s.stats)
        cumulative, buckets = 0, []
        for bound, count in zip((*bounds, float("inf")), counts, strict=True):
            cumulative += count
            buckets.append(("+Inf" if bound == float("inf") else repr(float(bound)), cumulative))
        family.add_metric([s.name, s.version], buckets, total)
    return family


class _ModelCollector(Collector):
    def __init__(self, metrics: AgentMetrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterator[Metric]:
        samples = self._metrics.samples()

        def counter(name: str, doc: str, value: Callable[[ModelSample], float]) -> CounterMetricFamily:
            family = CounterMetricFamily(name, doc, labels=_LABELS)
            for s in samples:
                family.add_metric([s.name, s.version], value(s))
            return family

        def gauge(name: str, doc: str, value: Callable[[ModelSample], float]) -> GaugeMetricFamily:
            family = GaugeMetricFamily(name, doc, labels=_LABELS)
            for s in samples:
                family.add_metric([s.name, s.version], value(s))
            return family

        yield counter(
            "edgefleet_inference_request_success",
            "Successful inference requests",
            lambda s: s.stats.success.count,
        )
        failure = CounterMetricFamily(
            "edgefleet_inference_request_failure", "Failed inference requests", labels=[*_LABELS, "reason"]
        )
        for s in samples:
            for reason, n in sorted(s.stats.failures.items()):
                failure.add_metric([s.name, s.version, reason], n)
        yield failure
        yield counter(
            "edgefleet_inference_count",
            "Inferences performed (rows of all batches)",
            lambda s: s.stats.inference_count,
        )
        yield counter(
            "edgefleet_inference_exec_count", "Engine executions (batches)", lambda s: s.stats.execution_count
        )
        yield counter(
            "edgefleet_inference_queue_duration_us",
            "Cumulative queue time of requests (µs)",
            lambda s: s.stats.queue.ns / 1e3,
        )
        yield counter(
            "edgefleet_inference_compute_infer_duration_us",
            "Cumulative engine time of requests (µs)",
            lambda s: s.stats.compute_infer.ns / 1e3,
        )
        yield _histogram(
            "edgefleet_inference_request_duration_seconds",
            "Request latency, queue and compute",
            samples,
            LATENCY_BUCKETS,
            lambda st: (st.latency_buckets, st.latency_sum_s),
        )
        yield _histogram(
            "edgefleet_inference_batch_size",
            "Rows per engine execution",
            samples,
            BATCH_BUCKETS,
            lambda st: (st.batch_buckets, float(st.inference_count)),
        )
        yield gauge("edgefleet_inference_pending_request_count", "Requests waiting in the queue", lambda s: s.pending)
        yield gauge(
            "edgefleet_batcher_max_batch_size",
            "Batch size the adaptive batcher chose",
            lambda s: s.plan_batch_size,
        )
        yield gauge("edgefleet_model_ready", "1 when the model version is READY", lambda s: float(s.ready))
        profile = GaugeMetricFamily(
            "edgefleet_batcher_profile_throughput",
            "Profiled inferences per second at each batch size",
            labels=[*_LABELS, "batch_size"],
        )
        for s in samples:
            for size, throughput in s.profile:
                profile.add_metric([s.name, s.version, str(size)], throughput)
        yield profile


class _OutboxCollector(Collector):
    def __init__(self, counters: Callable[[], OutboxFigures]) -> None:
        self._counters = counters

    def collect(self) -> Iterator[Metric]:
        c = self._counters()
        yield GaugeMetricFamily("edgefleet_outbox_depth", "Records kept, waiting for the cloud's ack", c.depth)
        yield GaugeMetricFamily(
            "edgefleet_outbox_bytes", "Bytes the kept records count against buffer.max_bytes", c.bytes
        )
        # The ledger: produced = depth + quarantined + delivered + evicted + rejected.
        for name, doc, value in (
            ("produced", "Records ever committed to the outbox", c.produced_total),
            ("delivered", "Records the cloud acknowledged as stored", c.delivered_total),
            ("evicted", "Records evicted before the cloud had them (buffer bounds)", c.evicted_total),
            ("rejected", "Records the cloud acknowledged as rejected (quarantined there or here)", c.rejected_total),
        ):
            yield CounterMetricFamily(f"edgefleet_outbox_{name}", doc, value)
        yield GaugeMetricFamily(
            "edgefleet_outbox_quarantined",
            "Records quarantined here, their rejection not yet acknowledged",
            c.quarantined,
        )
        yield GaugeMetricFamily("edgefleet_outbox_acked_seq", "Highest seq the cloud acknowledged", c.acked_seq)
        oldest = c.oldest_created_at_ms
        lag = max(0.0, time.time() - oldest / 1000) if oldest is not None else 0.0
        yield GaugeMetricFamily(
            "edgefleet_outbox_upload_lag_seconds", "Age of the oldest record not yet acknowledged", lag
        )
