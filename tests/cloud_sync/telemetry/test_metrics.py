"""Fleet metrics from the store, and the pure rollup of per-device windows."""

from __future__ import annotations

from prometheus_client import CollectorRegistry

from cloud_sync.store import Database
from cloud_sync.store.database import now_ms
from cloud_sync.store.telemetry import StatusReceived, TelemetryReceived, TelemetryStore
from cloud_sync.telemetry import TelemetryMetrics
from cloud_sync.telemetry.rollup import DeviceWindows, combine_device_windows
from tests.cloud_sync.telemetry.conftest import telemetry, version


def device(device_id: str, requests: int, p99_request_ms: float, window_s: float = 10.0) -> DeviceWindows:
    return DeviceWindows(
        device_id=device_id,
        windows=1,
        window_s=window_s,
        requests=requests,
        errors=0,
        inferences=2 * requests,
        executions=requests,
        p99_request_ms=p99_request_ms,
        p99_max_ms=p99_request_ms / requests if requests else 0.0,
        cpu_seconds=0.5,
        energy_joules=2.0,
        shadow_compared=4,
        shadow_agreed=3,
    )


def test_an_empty_rollup_is_all_zeros() -> None:
    w = combine_device_windows("digits", 1, [])
    assert (w.devices, w.requests, w.p99_ms, w.error_rate, w.requests_per_s, w.mean_batch_size) == (0, 0, 0, 0, 0, 0)
    assert (w.shadow_agreement, w.cpu_seconds_per_inference, w.joules_per_inference) == (0, 0, 0)


def test_the_gate_p99_is_the_worst_devices_not_one_window_spike() -> None:
    # a: 100 requests at 2 ms; b: 10 requests at 8 ms; c: idle.
    w = combine_device_windows("digits", 1, [device("a", 100, 200.0), device("b", 10, 80.0), device("c", 0, 0.0)])
    assert w.p99_ms == 8.0
    assert w.p99_weighted_ms == 280.0 / 110
    assert w.requests_per_s == 11.0 and w.mean_batch_size == 2.0
    assert w.shadow_agreement == 0.75 and w.joules_per_inference == 6.0 / 220


def test_the_collector_exports_presence_and_per_version_figures(db: Database) -> None:
    store = TelemetryStore(db)
    now = now_ms()
    messages = [
        telemetry("cam-1", 1, timestamp_ms=now - 1000, models=[version(requests=50, errors=5, p99_ms=4.0)]),
        telemetry("cam-2", 1, timestamp_ms=now - 1000, models=[version(requests=30, errors=0, p99_ms=6.0)]),
    ]
    store.write([TelemetryReceived(m.device_id, m, m.SerializeToString(), now) for m in messages])
    store.write([StatusReceived("cam-2", False, now)])
    registry = CollectorRegistry()
    registry.register(TelemetryMetrics(store, horizon_s=60))
    value = registry.get_sample_value
    labels = {"model": "digits", "version": "1"}
    assert value("cloud_sync_devices_online") == 1 and value("cloud_sync_devices_offline") == 1
    assert value("cloud_sync_model_requests_per_second", labels) == 8.0  # 50/10 s + 30/10 s
    assert value("cloud_sync_model_error_ratio", labels) == 5 / 80
    assert value("cloud_sync_model_p99_latency_seconds", labels) == 0.006
    assert value("cloud_sync_model_devices_reporting", labels) == 2
