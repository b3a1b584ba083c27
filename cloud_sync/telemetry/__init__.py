"""Device telemetry and presence over MQTT: the subscriber, its validation, fleet rollups, metrics and the ACL.

    store = TelemetryStore(db)                                   # cloud_sync/store/telemetry.py
    subscriber = TelemetrySubscriber(store, "mqtt://broker:1883", client_id="cloud-sync-0")
    subscriber.start()
    registry.register(TelemetryMetrics(store, subscriber))       # /metrics

Names are imported on first use: the store imports `rollup` from here, and must not pull in the subscriber.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "TelemetrySubscriber": "cloud_sync.telemetry.subscriber",
    "SubscriberStats": "cloud_sync.telemetry.subscriber",
    "TelemetryMetrics": "cloud_sync.telemetry.metrics",
    "ModelWindow": "cloud_sync.telemetry.rollup",
    "REASONS": "cloud_sync.telemetry.validation",
    "acl_text": "cloud_sync.telemetry.acl",
    "write_acl_file": "cloud_sync.telemetry.acl",
    "write_fleet_acl": "cloud_sync.telemetry.acl",
}

__all__ = [
    "REASONS",
    "ModelWindow",
    "SubscriberStats",
    "TelemetryMetrics",
    "TelemetrySubscriber",
    "acl_text",
    "write_acl_file",
    "write_fleet_acl",
]

if TYPE_CHECKING:
    from cloud_sync.telemetry.acl import acl_text, write_acl_file, write_fleet_acl
    from cloud_sync.telemetry.metrics import TelemetryMetrics
    from cloud_sync.telemetry.rollup import ModelWindow
    from cloud_sync.telemetry.subscriber import SubscriberStats, TelemetrySubscriber
    from cloud_sync.telemetry.validation import REASONS


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'cloud_sync.telemetry' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
