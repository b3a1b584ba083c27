"""Model telemetry as time series: per version, per time step, the fleet's latency, throughput and error rate.

What the dashboard's charts read (`GET /v1/models/series`); one query over the model_telemetry windows, grouped
by version and step in SQL, the same on SQLite and PostgreSQL. Not the rollout gates nor `compare` (they sum
one window each; cloud_sync/store/telemetry.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import sqlalchemy as sa

from cloud_sync.store.database import Database
from cloud_sync.store.telemetry import model_telemetry

__all__ = ["SeriesPoint", "VersionSeries", "model_series"]

# The largest IN (...) list one statement carries (as the telemetry store's own queries).
_IN_CHUNK = 1000


@dataclass(frozen=True)
class SeriesPoint:
    """One step of one version: windows that ended in [t_ms, t_ms + step).

    p50/p99: each window's percentile weighted by its requests (no histograms are shipped, so no true fleet
    percentile exists; see cloud_sync/telemetry/rollup.py). requests_per_s: the fleet's rate, the step's
    requests over the time the devices' windows covered, per device. None where the step had no request.
    """

    t_ms: int
    p50_ms: float | None
    p99_ms: float | None
    requests_per_s: float
    error_rate: float | None


@dataclass(frozen=True)
class VersionSeries:
    version: int
    points: list[SeriesPoint]


@dataclass(frozen=True)
class _Sums:
    requests: int = 0
    errors: int = 0
    p50: float = 0.0
    p99: float = 0.0
    window_s: float = 0.0
    devices: int = 0

    def plus(self, other: _Sums) -> _Sums:
        return _Sums(
            self.requests + other.requests,
            self.errors + other.errors,
            self.p50 + other.p50,
            self.p99 + other.p99,
            self.window_s + other.window_s,
            self.devices + other.devices,
        )


def point(t_ms: int, sums: _Sums, step_s: int) -> SeriesPoint:
    """The figures of one step from its sums (pure)."""
    # Time the windows covered, per device: a step's whole length once it is over, less for the step now
    # running (so its rate is not shown low). Never more than the step: windows straddle its edges.
    covered = min(sums.window_s / sums.devices, float(step_s)) if sums.devices else float(step_s)
    covered = max(covered, 1e-3)
    if not sums.requests:
        return SeriesPoint(t_ms, None, None, 0.0, None)
    return SeriesPoint(
        t_ms,
        sums.p50 / sums.requests,
        sums.p99 / sums.requests,
        sums.requests / covered,
        sums.errors / sums.requests,
    )


def model_series(
    db: Database, model: str, since_ms: int, step_s: int, device_ids: Sequence[str] | None = None
) -> list[VersionSeries]:
    """Every version of `model` with windows ending after `since_ms`, a point per `step_s` that has windows.

    `device_ids`: only those devices (None: every device). Steps start at multiples of step_s since the epoch.
    """
    m = model_telemetry.c
    step_ms = step_s * 1000
    bucket = ((m.window_end_ms // step_ms) * step_ms).label("t_ms")
    base = (
        sa.select(
            m.version,
            bucket,
            sa.func.sum(m.requests).label("requests"),
            sa.func.sum(m.errors).label("errors"),
            sa.func.sum(m.requests * m.p50_ms).label("p50"),
            sa.func.sum(m.requests * m.p99_ms).label("p99"),
            sa.func.sum(m.window_s).label("window_s"),
            sa.func.count(sa.distinct(m.device_id)).label("devices"),
        )
        .where(m.model == model, m.window_end_ms > since_ms)
        .group_by(m.version, bucket)
    )

    def query(conn: sa.Connection) -> dict[tuple[int, int], _Sums]:
        if device_ids is None:
            statements = [base]
        else:
            ids = sorted(set(device_ids))
            statements = [base.where(m.device_id.in_(ids[i : i + _IN_CHUNK])) for i in range(0, len(ids), _IN_CHUNK)]
        found: dict[tuple[int, int], _Sums] = {}
        for statement in statements:
            for row in conn.execute(statement):
                key = (int(row.version), int(row.t_ms))
                sums = _Sums(
                    int(row.requests or 0),
                    int(row.errors or 0),
                    float(row.p50 or 0.0),
                    float(row.p99 or 0.0),
                    float(row.window_s or 0.0),
                    int(row.devices or 0),
                )
                found[key] = found.get(key, _Sums()).plus(sums)
        return found

    grouped = db.read(query)
    series: dict[int, list[SeriesPoint]] = {}
    for (version, t_ms), sums in sorted(grouped.items()):
        series.setdefault(version, []).append(point(t_ms, sums, step_s))
    return [VersionSeries(version, points) for version, points in sorted(series.items())]
