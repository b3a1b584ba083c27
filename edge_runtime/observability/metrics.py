"""Prometheus metrics of the agent, named after Triton's (`nv_inference_*` -> `edgefleet_inference_*`) but in
base units (seconds, bytes), as Prometheus' naming rules and `promtool check metrics` ask; docs/observability.md
maps each one to its Triton counterpart.

Per-model figures are not Prometheus objects on the hot path: each model version keeps plain counters in
its ModelStats (one lock per batch) and this collector reads them at scrape time, as Triton exports its
own statistics. Measured: nine prometheus_client updates per request cost more than the digits model's
whole inference. One registry per agent; tests build their own.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field

from prometheus_client import GC_COLLECTOR, PLATFORM_COLLECTOR, PROCESS_COLLECTOR, CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from edge_runtime.inference.hard import HardCounts
from edge_runtime.inference.stats import BATCH_BUCKETS, LATENCY_BUCKETS, StatsSnapshot
from edge_runtime.observability.dataplane import (
    BufferLimits,
    OutboxCollector,
    OutboxFigures,
    UplinkCollector,
    UplinkFigures,
)
from edge_runtime.observability.states import ModelStateCollector, ModelStateFigure

__all__ = [
    "FAILURE_REASONS",
    "AgentMetrics",
    "BufferLimits",
    "ModelSample",
    "ModelStateFigure",
    "OutboxFigures",
    "UplinkFigures",
]

_LABELS = ["model", "version"]
# Every reason the batcher and the served model count a failed request under (inference/stats.py callers):
# each is exported at 0 as soon as a model version is tracked, so `rate()` and alerts see the series before
# the first failure rather than a series that appears from nowhere.
# The same for the reasons a hard example is kept (inference/hard.py).
HARD_REASONS = ("disagreement", "uncertain")
FAILURE_REASONS = ("cancelled", "engine", "invalid_input", "queue_full", "shutdown", "timeout")


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
    hard: HardCounts = field(
        default_factory=HardCounts
    )  # hard examples kept (by reason), their bytes, those over budget


class AgentMetrics:
    """The agent's registry: every tracked model version, the outbox and the uplink, and the process.

    `process_metrics` adds prometheus_client's process, platform and GC collectors (process_cpu_seconds_total,
    process_resident_memory_bytes, python_gc_*...), the figures its default registry carries; they read /proc
    only at scrape time.
    """

    def __init__(self, registry: CollectorRegistry | None = None, *, process_metrics: bool = True) -> None:
        self.registry = registry or CollectorRegistry()
        self._sources: dict[tuple[str, int], Callable[[], ModelSample]] = {}
        self._lock = threading.Lock()
        self.registry.register(_ModelCollector(self))
        if process_metrics:
            # The default registry's own instances: they hold no state but the boot time ProcessCollector read
            # at import, so sharing them across registries is safe (and costs no /proc read here).
            for collector in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):
                self.registry.register(collector)

    def track_outbox(
        self, counters: Callable[[], OutboxFigures], limits: Callable[[], BufferLimits] | None = None
    ) -> None:
        """Export the outbox's ledger (read at scrape time: no work on the append path), and with `limits`
        the buffer bounds in force (the policy's buffer section), so alerts can compare the two."""
        self.registry.register(OutboxCollector(counters, limits))

    def track_uplink(
        self, status: Callable[[], UplinkFigures], failures: Callable[[], Mapping[str, int]] | None = None
    ) -> None:
        """Export the uploader's status; `failures` maps a gRPC status code name to failed streams so far."""
        self.registry.register(UplinkCollector(status, failures))

    def track_model_states(self, states: Callable[[], Iterable[ModelStateFigure]]) -> None:
        """Export each model version's state as the control plane reports it (DOWNLOADING ... FAILED)."""
        self.registry.register(ModelStateCollector(states))

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
            "edgefleet_inference_request_failure", "Failed inference requests, by reason", labels=[*_LABELS, "reason"]
        )
        for s in samples:
            counts = dict.fromkeys(FAILURE_REASONS, 0) | s.stats.failures
            for reason, n in sorted(counts.items()):
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
            "edgefleet_inference_queue_duration_seconds",
            "Cumulative time requests waited in the batcher's queue",
            lambda s: s.stats.queue.ns / 1e9,
        )
        yield counter(
            "edgefleet_inference_compute_infer_duration_seconds",
            "Cumulative engine time of requests (a batch's time counts once per request in it)",
            lambda s: s.stats.compute_infer.ns / 1e9,
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
        yield gauge("edgefleet_inference_pending_requests", "Requests waiting in the queue", lambda s: s.pending)
        yield gauge(
            "edgefleet_batcher_max_batch_size",
            "Batch size the adaptive batcher chose",
            lambda s: s.plan_batch_size,
        )
        yield gauge("edgefleet_model_ready", "1 when the model version is READY", lambda s: float(s.ready))
        hard = CounterMetricFamily(
            "edgefleet_hard_examples",
            "Hard examples kept in the outbox (uncertain answers, shadow disagreements), by reason",
            labels=[*_LABELS, "reason"],
        )
        for s in samples:
            for reason, n in sorted((dict.fromkeys(HARD_REASONS, 0) | dict(s.hard.kept)).items()):
                hard.add_metric([s.name, s.version, reason], n)
        yield hard
        yield counter(
            "edgefleet_hard_example_bytes",
            "Declared bytes of the hard examples kept (what the policy's byte budget counts)",
            lambda s: s.hard.bytes,
        )
        yield counter(
            "edgefleet_hard_examples_over_budget",
            "Hard examples left out because the window's byte budget was spent (never in the outbox's ledger)",
            lambda s: s.hard.over_budget,
        )
        profile = GaugeMetricFamily(
            "edgefleet_batcher_profile_throughput",
            "Profiled inferences per second at each batch size",
            labels=[*_LABELS, "batch_size"],
        )
        for s in samples:
            for size, throughput in s.profile:
                profile.add_metric([s.name, s.version, str(size)], throughput)
        yield profile
