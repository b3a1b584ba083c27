"""Fleet telemetry as Prometheus metrics: a collector over the store (fleet-wide) and the subscriber (this replica).

Not an HTTP endpoint: cloud-sync's /metrics serves the registry this collector is registered on
(`metrics_registry()`, which also carries the process's own figures).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import structlog
from prometheus_client import GC_COLLECTOR, PLATFORM_COLLECTOR, PROCESS_COLLECTOR, CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from cloud_sync.errors import CloudSyncError
from cloud_sync.store.database import now_ms
from cloud_sync.store.telemetry import TelemetryStore
from cloud_sync.telemetry.rollup import ModelWindow
from cloud_sync.telemetry.subscriber import TelemetrySubscriber
from cloud_sync.telemetry.validation import REASONS

__all__ = ["TelemetryMetrics", "metrics_registry"]

log = structlog.get_logger(__name__)
_LABELS = ["model", "version"]


def metrics_registry() -> CollectorRegistry:
    """A registry for cloud-sync's /metrics with prometheus_client's process, platform and GC collectors on it
    (process_cpu_seconds_total, process_resident_memory_bytes, python_gc_*), as its default registry has."""
    registry = CollectorRegistry()
    for collector in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):
        registry.register(collector)
    return registry


@dataclass(frozen=True)
class _FleetFigures:
    online: int
    offline: int
    windows: list[ModelWindow]


class TelemetryMetrics(Collector):
    """Register on a CollectorRegistry: `registry.register(TelemetryMetrics(store, subscriber))`.

    Per model version, figures cover the windows that ended in the last `horizon_s` seconds. Store figures
    are the same on every replica (they come from the shared database), so dashboards can take any replica's
    or the max; the subscriber's counters are this replica's (sum them). Reading the store costs two grouped
    queries, done at most once per `cache_s` however many scrapers there are; /metrics must be served off
    the event loop (FastAPI runs a sync endpoint in its thread pool).
    """

    def __init__(
        self,
        store: TelemetryStore,
        subscriber: TelemetrySubscriber | None = None,
        *,
        horizon_s: float = 300.0,
        cache_s: float = 5.0,
    ) -> None:
        self._store = store
        self._subscriber = subscriber
        self._horizon_ms = int(horizon_s * 1000)
        self._cache_s = cache_s
        self._lock = threading.Lock()
        self._cached: tuple[float, _FleetFigures] | None = None

    def _fleet(self) -> _FleetFigures | None:
        with self._lock:
            if self._cached is not None and time.monotonic() - self._cached[0] < self._cache_s:
                return self._cached[1]
            try:
                online, offline = self._store.online_count()
                windows = self._store.model_windows(now_ms() - self._horizon_ms)
            except CloudSyncError as exc:  # a scrape must not fail because the database is away
                log.warning("telemetry.metrics_unavailable", error=exc.message)
                return None
            figures = _FleetFigures(online, offline, windows)
            self._cached = (time.monotonic(), figures)
            return figures

    def describe(self) -> list[Metric]:
        # Present so that registering (even on an auto-describing registry) never queries the database.
        return []

    def collect(self) -> Iterator[Metric]:
        fleet = self._fleet()
        if fleet is not None:
            yield GaugeMetricFamily("cloud_sync_devices_online", "Devices whose last presence is online.", fleet.online)
            yield GaugeMetricFamily(
                "cloud_sync_devices_offline", "Devices whose last presence is offline.", fleet.offline
            )
            families = {
                "requests": GaugeMetricFamily(
                    "cloud_sync_model_requests_per_second", "Fleet request rate of a model version.", labels=_LABELS
                ),
                "errors": GaugeMetricFamily(
                    "cloud_sync_model_error_ratio", "Failed / all requests of a model version.", labels=_LABELS
                ),
                "p99": GaugeMetricFamily(
                    "cloud_sync_model_p99_latency_seconds",
                    "Worst device's request-weighted p99 latency of a model version (rollout gates use it).",
                    labels=_LABELS,
                ),
                "devices": GaugeMetricFamily(
                    "cloud_sync_model_devices_reporting", "Devices that reported a model version.", labels=_LABELS
                ),
            }
            for w in fleet.windows:
                labels = [w.model, str(w.version)]
                families["requests"].add_metric(labels, w.requests_per_s)
                families["errors"].add_metric(labels, w.error_rate)
                families["p99"].add_metric(labels, w.p99_ms / 1000)
                families["devices"].add_metric(labels, w.devices)
            yield from families.values()
        if self._subscriber is not None:
            stats = self._subscriber.stats()
            messages = CounterMetricFamily(
                "cloud_sync_telemetry_messages", "MQTT messages this replica stored, by kind.", labels=["kind"]
            )
            # Every kind and reason at 0 before its first message: alerts on their rate see a series from the start.
            for kind, n in sorted((dict.fromkeys(("status", "telemetry"), 0) | dict(stats.stored)).items()):
                messages.add_metric([kind], n)
            yield messages
            rejected = CounterMetricFamily(
                "cloud_sync_telemetry_rejected", "MQTT messages this replica ignored, by reason.", labels=["reason"]
            )
            for reason, n in sorted((dict.fromkeys(REASONS, 0) | dict(stats.rejected)).items()):
                rejected.add_metric([reason], n)
            yield rejected
            yield CounterMetricFamily(
                "cloud_sync_telemetry_clock_skewed",
                "Telemetry stamped too far ahead of the cloud's clock (a device clock is wrong), placed when received.",
                value=stats.clock_skewed,
            )
            yield GaugeMetricFamily(
                "cloud_sync_telemetry_queue_depth", "Messages waiting for the database writer.", stats.queued
            )
            yield GaugeMetricFamily(
                "cloud_sync_telemetry_connected", "1 while the subscriber is connected to the broker.", stats.connected
            )
