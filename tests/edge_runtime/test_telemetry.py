"""Telemetry: the window math (pure, property-tested), the system probe over a sysfs tree, the collector."""

from __future__ import annotations

import asyncio
import bisect
import math
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge_runtime.config import AgentConfig
from edge_runtime.inference.stats import LATENCY_BUCKETS, ModelStats, StatsSnapshot
from edge_runtime.inference.types import InferRequest
from edge_runtime.models.repository import ModelRepository
from edge_runtime.outbox import Outbox, OutboxRecord
from edge_runtime.telemetry import (
    SystemProbe,
    TelemetryCollector,
    deferred_probe,
    latency_quantile,
    model_version_telemetry,
    stats_window,
)
from edgefleet.proto.edgefleet.v1 import results_pb2
from edgefleet.proto.edgefleet.v1.state_pb2 import MODEL_ROLE_ACTIVE
from edgefleet.proto.edgefleet.v1.telemetry_pb2 import SystemTelemetry, Telemetry
from models.build import digits_holdout
from tests.loopcheck import LoopThread, SlowCallbacks
from tests.waiting import wait_for

# -- percentiles from histogram buckets --------------------------------------------------------------------


def histogram(samples: list[float]) -> list[int]:
    """Bucket samples as ModelStats does (bisect_left over LATENCY_BUCKETS, the last bucket for +Inf)."""
    counts = [0] * (len(LATENCY_BUCKETS) + 1)
    for s in samples:
        counts[bisect.bisect_left(LATENCY_BUCKETS, s)] += 1
    return counts


def bucket_bounds(value: float) -> tuple[float, float]:
    i = bisect.bisect_left(LATENCY_BUCKETS, value)
    lower = LATENCY_BUCKETS[i - 1] if i > 0 else 0.0
    upper = LATENCY_BUCKETS[i] if i < len(LATENCY_BUCKETS) else LATENCY_BUCKETS[-1]
    return lower, upper


latencies = st.lists(st.floats(min_value=0.0, max_value=20.0, allow_nan=False), min_size=1, max_size=300)


@given(latencies, st.floats(min_value=0.001, max_value=1.0))
def test_a_quantile_estimate_lies_in_the_bucket_of_the_true_quantile(samples: list[float], q: float) -> None:
    estimate = latency_quantile(histogram(samples), LATENCY_BUCKETS, q)
    true = sorted(samples)[math.ceil(q * len(samples)) - 1]  # the ceil(q*n)-th smallest sample
    lower, upper = bucket_bounds(true)
    assert lower <= estimate <= upper


@given(latencies)
def test_p50_p95_p99_are_monotone(samples: list[float]) -> None:
    counts = histogram(samples)
    p50, p95, p99 = (latency_quantile(counts, LATENCY_BUCKETS, q) for q in (0.5, 0.95, 0.99))
    assert 0 <= p50 <= p95 <= p99 <= LATENCY_BUCKETS[-1]


def test_quantiles_interpolate_inside_a_bucket_and_report_overflow_as_the_last_bound() -> None:
    assert latency_quantile([0] * 16, LATENCY_BUCKETS, 0.99) == 0.0
    # 100 samples in (1 ms, 2.5 ms]: the median is half-way through the bucket.
    counts = histogram([0.002] * 100)
    assert latency_quantile(counts, LATENCY_BUCKETS, 0.5) == pytest.approx(0.00175)
    assert latency_quantile(histogram([30.0] * 3), LATENCY_BUCKETS, 0.99) == 10.0


# -- windows: differences of cumulative snapshots -----------------------------------------------------------

batch_events = st.lists(
    st.one_of(
        st.tuples(
            st.just("batch"),
            st.integers(1, 8),  # rows
            st.lists(st.floats(0, 0.05), min_size=1, max_size=4),  # each request's queue time
            st.floats(0.0001, 2.0),  # compute
            st.booleans(),  # ok
        ),
        st.tuples(st.just("reject"), st.sampled_from(["overloaded", "timeout"])),
    ),
    max_size=40,
)


def feed(stats: ModelStats, events: list[tuple[object, ...]]) -> None:
    for event in events:
        if event[0] == "batch":
            _, rows, queue_s, compute_s, ok = event
            stats.on_batch(rows, len(queue_s), queue_s, compute_s, ok)  # type: ignore[arg-type]
        else:
            stats.on_rejected(event[1])  # type: ignore[arg-type]


@settings(max_examples=60)
@given(batch_events, batch_events)
def test_a_window_counts_exactly_what_happened_after_the_previous_snapshot(
    before: list[tuple[object, ...]], during: list[tuple[object, ...]]
) -> None:
    stats, alone = ModelStats(), ModelStats()
    feed(stats, before)
    first = stats.snapshot()
    feed(stats, during)
    feed(alone, during)
    window, expected = stats_window(first, stats.snapshot()), stats_window(None, alone.snapshot())
    assert window.requests == expected.requests and window.errors == expected.errors
    assert window.failures == expected.failures
    assert (window.inferences, window.executions) == (expected.inferences, expected.executions)
    assert window.latency_buckets == expected.latency_buckets
    assert window.engine_seconds == pytest.approx(expected.engine_seconds, abs=1e-6)


def test_a_window_after_a_counter_reset_starts_from_zero() -> None:
    old, new = ModelStats(), ModelStats()
    for _ in range(5):
        old.on_batch(2, 2, [0.001, 0.001], 0.002, True)
    new.on_batch(4, 1, [0.0], 0.003, True)
    window = stats_window(old.snapshot(), new.snapshot())  # a reloaded version: its counters began again
    assert (window.requests, window.inferences, window.executions) == (1, 4, 1)


def test_a_version_figures_come_from_its_window() -> None:
    stats = ModelStats()
    stats.on_batch(8, 4, [0.001] * 4, 0.002, True)  # 4 requests, 8 rows, one batch of 2 ms
    stats.on_batch(4, 2, [0.0, 0.0], 0.002, True)
    stats.on_batch(2, 1, [0.0], 0.5, False)  # an engine failure
    stats.on_rejected("overloaded")
    window = stats_window(StatsSnapshot(), stats.snapshot())
    v = model_version_telemetry("digits", 3, MODEL_ROLE_ACTIVE, window, queue_depth=7, power_w=10.0)
    assert (v.name, v.version, v.role, v.queue_depth) == ("digits", 3, MODEL_ROLE_ACTIVE, 7)
    assert (v.requests, v.errors, v.inferences) == (8, 2, 12)
    assert v.mean_batch_size == 6.0  # 12 rows / 2 successful batches
    # Engine time counts each batch once (4 ms), not once per request in it (compute_infer would say 12 ms).
    assert v.cpu_seconds == pytest.approx(0.004)
    assert v.energy_joules == pytest.approx(0.04)
    assert 0 < v.latency.p50_ms <= v.latency.p95_ms <= v.latency.p99_ms <= 5.0


# -- the system probe over a sysfs tree ---------------------------------------------------------------------


def write(root: Path, relative: str, text: str) -> None:
    path = root / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text + "\n")


def jetson_tree(root: Path, *, total_rail: bool) -> None:
    for n, (kind, millidegrees) in enumerate(
        [("CPU-therm", "45500"), ("GPU-therm", "52000"), ("PMIC-Die", "100000"), ("CV0-therm", "-256000")]
    ):
        write(root, f"sys/class/thermal/thermal_zone{n}/type", kind)
        write(root, f"sys/class/thermal/thermal_zone{n}/temp", millidegrees)
    write(root, "sys/devices/platform/bus@0/17000000.gpu/load", "734")
    hwmon = "sys/bus/i2c/drivers/ina3221/1-0040/hwmon/hwmon3"
    rails = [("VDD_IN" if total_rail else "VDD_GPU", 5000, 1200), ("VDD_CPU_GPU_CV", 5000, 400), ("VDD_SOC", 5000, 300)]
    for n, (label, mv, ma) in enumerate(rails, start=1):
        write(root, f"{hwmon}/in{n}_label", label)
        write(root, f"{hwmon}/in{n}_input", str(mv))
        write(root, f"{hwmon}/curr{n}_input", str(ma))
    write(root, f"{hwmon}/in7_label", "sum of shunt voltages")  # a label with no current: not a rail


def test_probe_reads_a_jetson_orin_tree(tmp_path: Path) -> None:
    jetson_tree(tmp_path, total_rail=True)
    probe = SystemProbe(tmp_path)
    assert probe.read_temperature_c() == 52.0  # PMIC-Die's fixed 100 °C and the -256 °C zone are ignored
    assert probe.read_gpu_percent() == pytest.approx(73.4)
    assert probe.read_power_w() == pytest.approx(6.0)  # VDD_IN alone: the other rails are parts of it


def test_probe_sums_the_rails_when_none_is_the_board_total(tmp_path: Path) -> None:
    jetson_tree(tmp_path, total_rail=False)
    assert SystemProbe(tmp_path).read_power_w() == pytest.approx(6.0 + 2.0 + 1.5)


def test_probe_reads_jetpack4_iio_rails(tmp_path: Path) -> None:
    iio = "sys/bus/i2c/drivers/ina3221x/6-0040/iio:device0"
    for n, (name, mw) in enumerate([("POM_5V_IN", "4200"), ("POM_5V_GPU", "800"), ("POM_5V_CPU", "900")]):
        write(tmp_path, f"{iio}/rail_name_{n}", name)
        write(tmp_path, f"{iio}/in_power{n}_input", mw)
    write(tmp_path, "sys/devices/gpu.0/load", "1000")
    probe = SystemProbe(tmp_path)
    assert probe.read_power_w() == pytest.approx(4.2)
    assert probe.read_gpu_percent() == 100.0


def test_what_a_board_lacks_reads_as_zero(tmp_path: Path) -> None:
    system = SystemProbe(tmp_path).read()  # an empty tree: no thermal zones, no GPU, no power monitor
    assert (system.temperature_c, system.gpu_percent, system.power_w) == (0.0, 0.0, 0.0)
    assert 0 < system.memory_used_bytes <= system.memory_total_bytes  # psutil reads the real machine
    assert 0.0 <= system.cpu_percent <= 100.0


def test_a_sensor_that_vanishes_reads_as_zero(tmp_path: Path) -> None:
    jetson_tree(tmp_path, total_rail=True)
    probe = SystemProbe(tmp_path)
    (tmp_path / "sys/devices/platform/bus@0/17000000.gpu/load").unlink()
    for n in range(1, 4):
        (tmp_path / f"sys/bus/i2c/drivers/ina3221/1-0040/hwmon/hwmon3/curr{n}_input").unlink()
    assert (probe.read_gpu_percent(), probe.read_power_w()) == (0.0, 0.0)


def test_the_real_machine_reads_without_error() -> None:
    system = SystemProbe().read()
    assert system.memory_total_bytes > system.memory_used_bytes > 0
    assert 0.0 <= system.cpu_percent <= 100.0


# -- the collector over a real repository and outbox ----------------------------------------------------------


@pytest.fixture
def digits(make_config: Callable[..., AgentConfig], model_packages: dict[str, Path]) -> Iterator[ModelRepository]:
    repo = ModelRepository(make_config(inference={"adaptive": False}))
    repo.install(model_packages["digits:1"])
    yield repo
    repo.close(timeout=5)


@pytest.fixture
def outbox(tmp_path: Path) -> Iterator[Outbox]:
    box = Outbox.open(tmp_path / "outbox.db", max_bytes=1 << 30, max_age_s=0)
    yield box
    box.close()


def keep(outbox: Outbox, created_at_ms: int) -> None:
    record = OutboxRecord(
        created_at_ms, "digits", 1, 1, results_pb2.RECORD_KIND_RESULT, "inference.ModelInferResponse", b"x" * 100
    )
    outbox.append(record).result(10)


def test_each_message_covers_the_window_since_the_previous_one(digits: ModelRepository, outbox: Outbox) -> None:
    pixels = digits_holdout()[0]
    collector = TelemetryCollector("cam-1", digits, outbox=outbox, agent_start_ms=1234)
    for i in range(5):
        digits.infer(InferRequest("digits", {"pixels": pixels[i : i + 2]}))  # 5 requests of 2 rows
    keep(outbox, time.time_ns() // 1_000_000 - 3000)
    first = collector.collect(SystemTelemetry(power_w=5.0))

    assert (first.device_id, first.seq, first.agent_start_ms) == ("cam-1", 1, 1234)
    assert first.window_s > 0 and first.timestamp_ms > 0
    (v,) = first.models
    assert (v.name, v.version, v.role) == ("digits", 1, MODEL_ROLE_ACTIVE)
    assert (v.requests, v.errors, v.inferences, v.queue_depth) == (5, 0, 10, 0)
    assert v.mean_batch_size == 2.0 and v.cpu_seconds > 0
    assert v.energy_joules == pytest.approx(5.0 * v.cpu_seconds)
    assert 0 < v.latency.p50_ms <= v.latency.p95_ms <= v.latency.p99_ms
    assert (first.outbox.depth, first.outbox.produced_total, first.outbox.acked_seq) == (1, 1, 0)
    assert first.outbox.upload_lag_s >= 3.0

    digits.infer(InferRequest("digits", {"pixels": pixels[:1]}))
    second = collector.collect(SystemTelemetry())
    assert second.seq == 2 and second.timestamp_ms >= first.timestamp_ms
    (v,) = second.models
    assert (v.requests, v.inferences, v.energy_joules) == (1, 1, 0.0)  # only the new request; no power rail
    assert Telemetry.FromString(second.SerializeToString()) == second


def test_run_publishes_every_interval_without_blocking_the_loop(digits: ModelRepository) -> None:
    collector = TelemetryCollector("cam-1", digits, system=SystemProbe().read, interval_s=0.02)
    published: list[bytes] = []
    slow = SlowCallbacks()

    async def main() -> None:
        loop = asyncio.get_running_loop()
        loop.slow_callback_duration = 0.05
        three = asyncio.Event()

        def publish(payload: bytes) -> None:
            published.append(payload)
            if len(published) == 3:
                three.set()

        task = asyncio.ensure_future(collector.run(publish))
        await asyncio.wait_for(three.wait(), 10)
        task.cancel()

    with slow:
        asyncio.run(main(), debug=True)
    assert [Telemetry.FromString(p).seq for p in published[:3]] == [1, 2, 3]
    assert not slow.blocking(), f"collecting blocked the loop: {slow.blocking()}"


def test_a_failing_publish_does_not_stop_telemetry(digits: ModelRepository) -> None:
    collector = TelemetryCollector("cam-1", digits, interval_s=0.01)
    calls: list[int] = []

    async def main() -> None:
        done = asyncio.Event()

        def publish(payload: bytes) -> None:
            calls.append(len(payload))
            if len(calls) == 3:
                done.set()
            raise OSError("broker gone")

        task = asyncio.ensure_future(collector.run(publish))
        await asyncio.wait_for(done.wait(), 10)
        task.cancel()

    asyncio.run(main())
    assert len(calls) >= 3


def test_run_reads_the_system_figures_on_its_own_thread_never_the_loop(digits: ModelRepository, tmp_path: Path) -> None:
    jetson_tree(tmp_path, total_rail=True)
    probe = deferred_probe(tmp_path)  # its discovery, too, happens on the first read: on the probe's thread
    readers: list[str] = []

    def system() -> SystemTelemetry:
        readers.append(threading.current_thread().name)
        return probe()

    collector = TelemetryCollector("cam-1", digits, system=system, interval_s=0.01)
    loop = LoopThread("agent-loop")
    published: list[Telemetry] = []
    try:
        task = loop.run(_start(collector, lambda p: published.append(Telemetry.FromString(p))))
        wait_for(lambda: len(published) >= 3, 10, "three messages")
        loop.run(_cancel(task))
    finally:
        loop.close()
    assert readers and all(name.startswith("telemetry-probe") for name in readers), readers
    assert published[0].system.power_w == pytest.approx(6.0)  # the Jetson tree, read through the probe
    assert loop.blocking() == []  # no sysfs or /proc read on the loop thread


def test_a_new_interval_takes_effect_at_once(digits: ModelRepository) -> None:
    collector = TelemetryCollector("cam-1", digits, interval_s=3600)
    loop = LoopThread("agent-loop")
    published: list[bytes] = []
    try:
        task = loop.run(_start(collector, published.append))
        loop.call(collector.set_interval, 0.02)  # while run() sleeps out the hour
        wait_for(lambda: len(published) >= 3, 10, "messages at the new interval")
        loop.run(_cancel(task))
    finally:
        loop.close()
    assert [Telemetry.FromString(p).seq for p in published[:3]] == [1, 2, 3]


async def _start(collector: TelemetryCollector, publish: Callable[[bytes], None]) -> asyncio.Future[None]:
    return asyncio.ensure_future(collector.run(publish))


async def _cancel(task: asyncio.Future[None]) -> None:
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


def test_the_outbox_ledger_is_in_telemetry_and_on_the_metrics_page(outbox: Outbox) -> None:
    from prometheus_client import generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    from edge_runtime.observability.metrics import AgentMetrics
    from edge_runtime.telemetry import outbox_telemetry

    now = time.time_ns() // 1_000_000
    for _ in range(3):
        keep(outbox, now - 2000)
    outbox.ack(2, frozenset({2})).result(10)  # the cloud stored seq 1 and rejected seq 2

    message = outbox_telemetry(outbox.counters(), now)
    assert (message.produced_total, message.depth, message.delivered_total, message.rejected_total) == (3, 1, 1, 1)
    assert message.quarantined == 0 and message.acked_seq == 2

    metrics = AgentMetrics()
    metrics.track_outbox(outbox.counters)
    samples = {
        s.name: s.value
        for family in text_string_to_metric_families(generate_latest(metrics.registry).decode())
        for s in family.samples
    }
    assert samples["edgefleet_outbox_produced_total"] == 3
    assert samples["edgefleet_outbox_delivered_total"] == 1
    assert samples["edgefleet_outbox_rejected_total"] == 1
    assert samples["edgefleet_outbox_evicted_total"] == 0
    assert samples["edgefleet_outbox_depth"] == 1 and samples["edgefleet_outbox_acked_seq"] == 2
    assert samples["edgefleet_outbox_upload_lag_seconds"] >= 2.0
