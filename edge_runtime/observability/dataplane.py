"""The data plane's Prometheus figures: the outbox's ledger and bounds, and the uplink to cloud-sync.

Read at scrape time from snapshots their owners keep anyway (OutboxCounters, UplinkStatus): no work on the
append or upload path. Not where those figures are counted (edge_runtime/outbox/, edge_runtime/sync/uplink.py).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping
from typing import Protocol

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

__all__ = [
    "UPLINK_FAILURE_CODES",
    "BufferLimits",
    "OutboxCollector",
    "OutboxFigures",
    "UplinkCollector",
    "UplinkFigures",
]

# The gRPC codes an upload stream fails with in practice (cloud-sync's own mapping, the network, our
# cloud_behind check): exported at 0 from the start so an alert on their rate has a series to look at.
UPLINK_FAILURE_CODES = (
    "DEADLINE_EXCEEDED",
    "FAILED_PRECONDITION",
    "INTERNAL",
    "INVALID_ARGUMENT",
    "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED",
    "UNAUTHENTICATED",
    "UNAVAILABLE",
    "UNKNOWN",
)


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
    def last_seq(self) -> int: ...
    @property
    def oldest_created_at_ms(self) -> int | None: ...
    @property
    def pending(self) -> int: ...
    @property
    def refused_total(self) -> int: ...
    @property
    def failed_total(self) -> int: ...


class BufferLimits(Protocol):
    """The outbox bounds in force (edgefleet.policy.BufferPolicy: the config's, or the cloud policy's)."""

    @property
    def max_bytes(self) -> int: ...
    @property
    def max_age_s(self) -> float: ...


class UplinkFigures(Protocol):
    """The uploader's status (edge_runtime.sync.uplink.UplinkStatus)."""

    @property
    def connected(self) -> bool: ...
    @property
    def uploaded_total(self) -> int: ...
    @property
    def last_success_ms(self) -> int: ...
    @property
    def consecutive_failures(self) -> int: ...


class OutboxCollector(Collector):
    def __init__(self, counters: Callable[[], OutboxFigures], limits: Callable[[], BufferLimits] | None) -> None:
        self._counters = counters
        self._limits = limits

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
            ("refused", "Appends refused because the outbox's queue was full (this process)", c.refused_total),
            ("append_failures", "Appends that failed to commit: disk full, I/O errors (this process)", c.failed_total),
        ):
            yield CounterMetricFamily(f"edgefleet_outbox_{name}", doc, value)
        yield GaugeMetricFamily(
            "edgefleet_outbox_quarantined",
            "Records quarantined here, their rejection not yet acknowledged",
            c.quarantined,
        )
        yield GaugeMetricFamily("edgefleet_outbox_pending_appends", "Appends queued, not yet committed", c.pending)
        yield GaugeMetricFamily("edgefleet_outbox_last_seq", "Highest seq committed to the outbox", c.last_seq)
        yield GaugeMetricFamily("edgefleet_outbox_acked_seq", "Highest seq the cloud acknowledged", c.acked_seq)
        oldest = c.oldest_created_at_ms
        lag = max(0.0, time.time() - oldest / 1000) if oldest is not None else 0.0
        yield GaugeMetricFamily(
            "edgefleet_outbox_upload_lag_seconds", "Age of the oldest record not yet acknowledged", lag
        )
        if self._limits is not None:
            limits = self._limits()
            yield GaugeMetricFamily(
                "edgefleet_outbox_max_bytes", "buffer.max_bytes in force: past it records are evicted", limits.max_bytes
            )
            yield GaugeMetricFamily(
                "edgefleet_outbox_max_age_seconds",
                "buffer.max_age_s in force: older records are evicted (0: no age limit)",
                limits.max_age_s,
            )


class UplinkCollector(Collector):
    def __init__(self, status: Callable[[], UplinkFigures], failures: Callable[[], Mapping[str, int]] | None) -> None:
        self._status = status
        self._failures = failures

    def collect(self) -> Iterator[Metric]:
        s = self._status()
        yield GaugeMetricFamily(
            "edgefleet_uplink_connected", "1 while the last upload stream to cloud-sync succeeded", float(s.connected)
        )
        yield CounterMetricFamily(
            "edgefleet_uplink_stored_records", "Records cloud-sync acknowledged as newly stored", s.uploaded_total
        )
        yield GaugeMetricFamily(
            "edgefleet_uplink_last_success_timestamp_seconds",
            "Unix time of the last successful upload stream (0: none yet)",
            s.last_success_ms / 1000,
        )
        yield GaugeMetricFamily(
            "edgefleet_uplink_consecutive_failures",
            "Upload streams failed since the last success",
            s.consecutive_failures,
        )
        if self._failures is not None:
            family = CounterMetricFamily(
                "edgefleet_uplink_failures", "Upload streams that failed, by gRPC status code", labels=["code"]
            )
            counts = dict.fromkeys(UPLINK_FAILURE_CODES, 0) | dict(self._failures())
            for code, n in sorted(counts.items()):
                family.add_metric([code], n)
            yield family
