"""The window math of telemetry as pure functions over StatsSnapshot: deltas, percentiles, one version's figures.

Counts cover [timestamp_ms - window_s, timestamp_ms]: differences between two snapshots of cumulative counters.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from edge_runtime.inference.hard import HardCounts
from edge_runtime.inference.stats import LATENCY_BUCKETS, StatsSnapshot
from edgefleet.proto.edgefleet.v1.state_pb2 import ModelRole
from edgefleet.proto.edgefleet.v1.telemetry_pb2 import LatencySummary, ModelVersionTelemetry

__all__ = ["StatsWindow", "hard_window", "latency_quantile", "model_version_telemetry", "stats_window"]


@dataclass(frozen=True)
class StatsWindow:
    """What one model version did between two snapshots."""

    requests: int  # answered + failed (rejected ones included)
    errors: int
    failures: dict[str, int]  # errors by reason
    inferences: int  # rows inferred
    executions: int  # batches that ran successfully
    engine_seconds: float  # time the engine spent running batches (each batch counted once)
    latency_buckets: tuple[int, ...]  # non-cumulative counts per bucket of LATENCY_BUCKETS, the last for +Inf
    latency_sum_s: float

    @property
    def mean_batch_size(self) -> float:
        return self.inferences / self.executions if self.executions else 0.0


def _went_back(previous: StatsSnapshot, current: StatsSnapshot) -> bool:
    """Whether a counter decreased: the counters were reset (a reloaded version), so `previous` does not apply."""
    pairs = [
        (previous.success.count, current.success.count),
        (previous.fail.count, current.fail.count),
        (previous.inference_count, current.inference_count),
        (previous.execution_count, current.execution_count),
        *zip(previous.latency_buckets, current.latency_buckets, strict=True),
    ]
    return any(now < before for before, now in pairs)


def _engine_ns(snapshot: StatsSnapshot) -> dict[int, tuple[int, int]]:
    return {rows: (d.count, d.ns) for rows, d in snapshot.batches.items()}


def stats_window(previous: StatsSnapshot | None, current: StatsSnapshot) -> StatsWindow:
    """The window from `previous` to `current` (from zero when `previous` is None or the counters were reset)."""
    if previous is None or _went_back(previous, current):
        previous = StatsSnapshot()
    before = _engine_ns(previous)
    executions, engine_ns = 0, 0
    # Per batch size: compute_infer counts each batch's time once per request in it, the batch table once.
    for rows, (count, ns) in _engine_ns(current).items():
        count0, ns0 = before.get(rows, (0, 0))
        executions += count - count0
        engine_ns += ns - ns0
    failures = {
        reason: n - previous.failures.get(reason, 0)
        for reason, n in current.failures.items()
        if n > previous.failures.get(reason, 0)
    }
    success = current.success.count - previous.success.count
    errors = current.fail.count - previous.fail.count
    return StatsWindow(
        requests=success + errors,
        errors=errors,
        failures=failures,
        inferences=current.inference_count - previous.inference_count,
        executions=executions,
        engine_seconds=engine_ns / 1e9,
        latency_buckets=tuple(
            now - before for now, before in zip(current.latency_buckets, previous.latency_buckets, strict=True)
        ),
        latency_sum_s=max(0.0, current.latency_sum_s - previous.latency_sum_s),
    )


def hard_window(previous: HardCounts | None, current: HardCounts) -> tuple[int, int, int]:
    """(kept, bytes, over budget) hard examples from `previous` to `current` (from zero when `previous` is None
    or a counter went back: a reloaded version has new counters)."""
    if previous is None or any(
        now < before
        for before, now in (
            (previous.kept_total, current.kept_total),
            (previous.bytes, current.bytes),
            (previous.over_budget, current.over_budget),
        )
    ):
        previous = HardCounts()
    return (
        current.kept_total - previous.kept_total,
        current.bytes - previous.bytes,
        current.over_budget - previous.over_budget,
    )


def latency_quantile(counts: Sequence[int], bounds: Sequence[float] = LATENCY_BUCKETS, q: float = 0.99) -> float:
    """The q-quantile (0 < q <= 1) of a histogram: `counts` per bucket of `bounds` (upper bounds), then +Inf.

    Resolution: the estimate lies in the bucket that holds the true q-quantile of the samples (the
    ceil(q*n)-th smallest), interpolated linearly inside it, so its error is at most that bucket's width:
    0.1 ms below 0.1 ms, 0.15 ms in (0.1, 0.25] ms, ... 1.5 ms in (1, 2.5] ms, 15 ms in (10, 25] ms, 7.5 s in
    (2.5, 10] s. Past the last bound the quantile is reported as the last bound (10 s): "at least".
    Returns seconds (0 for an empty histogram).
    """
    total = sum(counts)
    if total <= 0:
        return 0.0
    rank = q * total
    cumulative = 0
    for i, count in enumerate(counts):
        if count <= 0:
            continue
        if cumulative + count >= rank:
            if i >= len(bounds):
                return float(bounds[-1])
            lower = float(bounds[i - 1]) if i > 0 else 0.0
            upper = float(bounds[i])
            return lower + (upper - lower) * (rank - cumulative) / count
        cumulative += count
    return float(bounds[-1])  # only float rounding of q * total gets here


def model_version_telemetry(
    name: str,
    version: int,
    role: ModelRole.ValueType,
    window: StatsWindow,
    *,
    queue_depth: int,
    power_w: float = 0.0,
    shadow_compared: int = 0,
    shadow_agreed: int = 0,
    hard_examples: tuple[int, int, int] = (0, 0, 0),
) -> ModelVersionTelemetry:
    """One version's figures for a Telemetry message.

    cpu_seconds is the engine's busy time in the window (wall time of its batches; with several intra-op
    threads the CPU time spent can be a multiple of it). energy_joules is the board's input power, sampled
    at collection, times that busy time: an estimate that charges the version the board's whole draw while
    it ran, idle power included; 0 where the board reports no power rails. For a SHADOW version the requests
    and latency are its mirrored runs', and shadow_compared/agreed its answers judged against the active's.
    `hard_examples` is (kept, bytes, over budget) in the window (a disagreement counts on the ACTIVE version,
    whose answer its record carries).
    """
    buckets = window.latency_buckets
    return ModelVersionTelemetry(
        name=name,
        version=version,
        role=role,
        requests=window.requests,
        errors=window.errors,
        inferences=window.inferences,
        latency=LatencySummary(
            p50_ms=latency_quantile(buckets, LATENCY_BUCKETS, 0.50) * 1e3,
            p95_ms=latency_quantile(buckets, LATENCY_BUCKETS, 0.95) * 1e3,
            p99_ms=latency_quantile(buckets, LATENCY_BUCKETS, 0.99) * 1e3,
        ),
        mean_batch_size=window.mean_batch_size,
        queue_depth=queue_depth,
        cpu_seconds=window.engine_seconds,
        energy_joules=power_w * window.engine_seconds if power_w > 0 else 0.0,
        shadow_compared=shadow_compared,
        shadow_agreed=shadow_agreed,
        hard_examples_kept=hard_examples[0],
        hard_examples_bytes=hard_examples[1],
        hard_examples_over_budget=hard_examples[2],
    )
