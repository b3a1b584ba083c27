"""Telemetry: what the device reports every `telemetry.interval_s` (per model version, outbox, system).

`TelemetryCollector` builds the edgefleet.v1.Telemetry message; the window math is pure (`stats_window`,
`latency_quantile`); `SystemProbe` reads the board (on the collector's own thread). Sending it is a control
transport's job (edge_runtime/sync/control.py).
"""

from edge_runtime.telemetry._collector import (
    CounterSource,
    ModelSource,
    ServedVersion,
    TelemetryCollector,
    outbox_telemetry,
)
from edge_runtime.telemetry._system import SystemProbe, deferred_probe
from edge_runtime.telemetry._window import (
    StatsWindow,
    hard_window,
    latency_quantile,
    model_version_telemetry,
    stats_window,
)

__all__ = [
    "CounterSource",
    "ModelSource",
    "ServedVersion",
    "StatsWindow",
    "SystemProbe",
    "TelemetryCollector",
    "deferred_probe",
    "hard_window",
    "latency_quantile",
    "model_version_telemetry",
    "outbox_telemetry",
    "stats_window",
]
