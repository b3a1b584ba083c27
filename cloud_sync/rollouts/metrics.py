"""Rollouts as Prometheus metrics: how many are in each state, and their events by kind (aborted, completed...).

Read from the shared database at scrape time (at most once per `cache_s`), so every replica shows the same
fleet-wide figures and nothing needs incrementing where rollouts change. Register it on cloud-sync's registry:
`registry.register(RolloutMetrics(db))`.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import sqlalchemy as sa
import structlog
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from cloud_sync.errors import CloudSyncError
from cloud_sync.rollouts.plan import EVENT_KINDS, STATES
from cloud_sync.rollouts.store import rollout_events, rollouts
from cloud_sync.store import Database

__all__ = ["RolloutCounts", "RolloutMetrics", "rollout_counts"]

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class RolloutCounts:
    """Rollouts per state and events per kind, every known state and kind present (0 when none)."""

    states: dict[str, int]
    events: dict[str, int]


def rollout_counts(db: Database) -> RolloutCounts:
    """Two grouped queries over the rollout tables (blocking: call it off the event loop)."""

    def read(conn: sa.Connection) -> RolloutCounts:
        by_state = conn.execute(sa.select(rollouts.c.state, sa.func.count()).group_by(rollouts.c.state)).all()
        by_kind = conn.execute(sa.select(rollout_events.c.kind, sa.func.count()).group_by(rollout_events.c.kind)).all()
        states = dict.fromkeys(STATES, 0) | {str(state): int(n) for state, n in by_state}
        events = dict.fromkeys(EVENT_KINDS, 0) | {str(kind): int(n) for kind, n in by_kind}
        return RolloutCounts(states, events)

    return db.read(read)


class RolloutMetrics(Collector):
    """`cloud_sync_rollouts{state}` and `cloud_sync_rollout_events_total{kind}`; a scrape while the database
    is away leaves them out (and logs why) rather than failing the whole page."""

    def __init__(self, db: Database, *, cache_s: float = 5.0) -> None:
        self._db = db
        self._cache_s = cache_s
        self._lock = threading.Lock()
        self._cached: tuple[float, RolloutCounts] | None = None

    def _counts(self) -> RolloutCounts | None:
        with self._lock:
            if self._cached is not None and time.monotonic() - self._cached[0] < self._cache_s:
                return self._cached[1]
            try:
                counts = rollout_counts(self._db)
            except CloudSyncError as exc:
                log.warning("rollouts.metrics_unavailable", error=exc.message)
                return None
            self._cached = (time.monotonic(), counts)
            return counts

    def describe(self) -> list[Metric]:
        return []  # registering must not query the database

    def collect(self) -> Iterator[Metric]:
        counts = self._counts()
        if counts is None:
            return
        states = GaugeMetricFamily(
            "cloud_sync_rollouts", "Rollouts in each state (running, paused, completed, aborted).", labels=["state"]
        )
        for state, n in sorted(counts.states.items()):
            states.add_metric([state], n)
        yield states
        events = CounterMetricFamily(
            "cloud_sync_rollout_events",
            "Rollout events recorded, by kind (aborted, gate_failed, completed...), fleet-wide.",
            labels=["kind"],
        )
        for kind, n in sorted(counts.events.items()):
            events.add_metric([kind], n)
        yield events
