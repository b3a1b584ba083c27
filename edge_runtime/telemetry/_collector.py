"""TelemetryCollector: one Telemetry message per interval from the served versions, the outbox and the system.

Collecting reads counters only; not the transport (`run` hands the bytes to the `publish` it is given).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol

import structlog

from edge_runtime.inference.hard import HardCounts, HardModel
from edge_runtime.inference.stats import StatsSnapshot
from edge_runtime.outbox import OutboxCounters
from edge_runtime.telemetry._window import hard_window, model_version_telemetry, stats_window
from edgefleet.proto.edgefleet.v1.state_pb2 import ModelRole
from edgefleet.proto.edgefleet.v1.telemetry_pb2 import OutboxTelemetry, SystemTelemetry, Telemetry

__all__ = ["CounterSource", "ModelSource", "ServedVersion", "TelemetryCollector", "outbox_telemetry"]

log = structlog.get_logger(__name__)


class _Snapshots(Protocol):
    def snapshot(self) -> StatsSnapshot: ...


class _Pending(Protocol):
    def pending(self) -> int: ...


class ServedVersion(Protocol):
    """What telemetry reads of a served model version (edge_runtime.models.served.ServedModel)."""

    @property
    def name(self) -> str: ...
    @property
    def version(self) -> int: ...
    @property
    def stats(self) -> _Snapshots: ...
    @property
    def batcher(self) -> _Pending: ...
    @property
    def hard(self) -> HardModel: ...


class ShadowSource(Protocol):
    """A shadow's cumulative counts (edge_runtime.models.shadow.ShadowCounts)."""

    @property
    def compared(self) -> int: ...
    @property
    def agreed(self) -> int: ...


class ModelSource(Protocol):
    """The served versions (edge_runtime.models.repository.ModelRepository)."""

    def models(self) -> Sequence[ServedVersion]: ...
    def active_version(self, name: str) -> int | None: ...

    def shadow_counts(self) -> Mapping[tuple[str, int], tuple[object, ShadowSource]]:
        """(name, version) of each SHADOW version -> (its counters' owner, its cumulative counts)."""
        ...


class CounterSource(Protocol):
    """The outbox (edge_runtime.outbox.Outbox)."""

    def counters(self) -> OutboxCounters: ...


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def outbox_telemetry(counters: OutboxCounters, now_ms: int) -> OutboxTelemetry:
    oldest = counters.oldest_created_at_ms
    return OutboxTelemetry(
        depth=counters.depth,
        bytes=counters.bytes,
        produced_total=counters.produced_total,
        evicted_total=counters.evicted_total,
        acked_seq=counters.acked_seq,
        upload_lag_s=max(0.0, (now_ms - oldest) / 1000) if oldest is not None else 0.0,
        delivered_total=counters.delivered_total,
        rejected_total=counters.rejected_total,
        quarantined=counters.quarantined,
    )


class TelemetryCollector:
    """Builds Telemetry messages; each covers the time since the previous one (or since construction).

    `collect` reads counters only (a snapshot under each version's lock, the outbox's counters) and calls
    `system` (SystemProbe.read: sysfs, psutil, i2c power monitors on a Jetson) unless given the figures.
    `run` reads them on a named thread of its own, so the loop never waits on a sensor file.
    """

    def __init__(
        self,
        device_id: str,
        models: ModelSource,
        *,
        outbox: CounterSource | None = None,
        system: Callable[[], SystemTelemetry] | None = None,
        interval_s: float = 10.0,
        agent_start_ms: int | None = None,
    ) -> None:
        self.device_id = device_id
        self.interval_s = interval_s  # set_interval changes it live (a policy's telemetry.interval_s)
        self._interval_changed: asyncio.Event | None = None
        self._models = models
        self._outbox = outbox
        self._system = system
        self.agent_start_ms = agent_start_ms if agent_start_ms is not None else _now_ms()
        self._seq = 0
        # (name, version) -> (the stats object, its last snapshot): a reloaded version has new stats.
        self._previous: dict[tuple[str, int], tuple[object, StatsSnapshot]] = {}
        # (name, version) -> (the shadow mirror, its counts at the last message): a shadow set anew starts at 0.
        self._previous_shadow: dict[tuple[str, int], tuple[object, tuple[int, int]]] = {}
        # (name, version) -> (the hard-example counter, its counts at the last message).
        self._previous_hard: dict[tuple[str, int], tuple[object, HardCounts]] = {}
        self._last = time.monotonic()
        self._snapshot_all()

    def collect(self, system: SystemTelemetry | None = None) -> Telemetry:
        """The message for the window since the previous call; `system` defaults to calling the system reader."""
        now = time.monotonic()
        now_ms = _now_ms()
        window_s, self._last = now - self._last, now
        if system is None:
            system = self._system() if self._system is not None else SystemTelemetry()
        self._seq += 1
        message = Telemetry(
            device_id=self.device_id,
            timestamp_ms=now_ms,
            window_s=window_s,
            system=system,
            seq=self._seq,
            agent_start_ms=self.agent_start_ms,
        )
        current: dict[tuple[str, int], tuple[object, StatsSnapshot]] = {}
        current_hard: dict[tuple[str, int], tuple[object, HardCounts]] = {}
        shadows = self._shadow_windows()
        for served in self._models.models():
            key = (served.name, served.version)
            stats = served.stats
            snapshot = stats.snapshot()
            current[key] = (stats, snapshot)
            owner, previous = self._previous.get(key, (None, None))
            window = stats_window(previous if owner is stats else None, snapshot)
            compared, agreed = shadows.get(key, (0, 0))
            counter = served.hard.counter
            hard = current_hard[key] = (counter, counter.snapshot())
            hard_owner, hard_before = self._previous_hard.get(key, (None, None))
            kept, kept_bytes, over_budget = hard_window(hard_before if hard_owner is counter else None, hard[1])
            if self._models.active_version(served.name) == served.version:
                role = ModelRole.MODEL_ROLE_ACTIVE
            elif key in shadows:
                role = ModelRole.MODEL_ROLE_SHADOW
            else:
                role = ModelRole.MODEL_ROLE_UNSPECIFIED
            message.models.append(
                model_version_telemetry(
                    served.name,
                    served.version,
                    role,
                    window,
                    queue_depth=served.batcher.pending(),
                    power_w=system.power_w,
                    shadow_compared=compared,
                    shadow_agreed=agreed,
                    hard_examples=(kept, kept_bytes, over_budget),
                )
            )
        self._previous = current  # versions that went away are forgotten
        self._previous_hard = current_hard
        if self._outbox is not None:
            message.outbox.CopyFrom(outbox_telemetry(self._outbox.counters(), now_ms))
        return message

    def set_interval(self, interval_s: float) -> None:
        """Publish every `interval_s` from now on; the next message comes within the new interval. Call on the loop."""
        self.interval_s = interval_s
        if self._interval_changed is not None:
            self._interval_changed.set()

    async def run(self, publish: Callable[[bytes], None]) -> None:
        """Every `interval_s`, collect and `publish(serialized message)`, until cancelled.

        The system figures are read on the `telemetry-probe` thread (a sysfs read can stall behind a busy
        i2c bus on a Jetson), the counters on the loop. A failure to collect or publish is logged and the next
        interval tries again: telemetry never stops the agent. After a stall the schedule restarts from now
        instead of catching up in a burst.
        """
        loop = asyncio.get_running_loop()
        self._interval_changed = changed = asyncio.Event()
        probe = ThreadPoolExecutor(1, thread_name_prefix="telemetry-probe") if self._system is not None else None
        try:
            next_at = time.monotonic() + self.interval_s
            while True:
                changed.clear()
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(changed.wait(), max(0.0, next_at - time.monotonic()))
                if changed.is_set():  # a new interval: count it from the previous message
                    next_at = min(next_at, self._last + self.interval_s)
                    if next_at > time.monotonic():
                        continue
                try:
                    system = await loop.run_in_executor(probe, self._system) if probe and self._system else None
                    publish(self.collect(system).SerializeToString())
                except Exception as exc:
                    log.error("telemetry.failed", error=f"{type(exc).__name__}: {exc}")
                next_at = max(next_at + self.interval_s, time.monotonic())
        finally:
            self._interval_changed = None
            if probe is not None:
                probe.shutdown(wait=False)

    def _shadow_windows(self) -> dict[tuple[str, int], tuple[int, int]]:
        """(name, version) of each shadow -> (compared, agreed) since the previous message."""
        out: dict[tuple[str, int], tuple[int, int]] = {}
        current: dict[tuple[str, int], tuple[object, tuple[int, int]]] = {}
        for key, (owner, counts) in self._models.shadow_counts().items():
            now = (counts.compared, counts.agreed)
            current[key] = (owner, now)
            previous_owner, before = self._previous_shadow.get(key, (None, (0, 0)))
            if previous_owner is not owner or now[0] < before[0] or now[1] < before[1]:
                before = (0, 0)
            out[key] = (now[0] - before[0], now[1] - before[1])
        self._previous_shadow = current
        return out

    def _snapshot_all(self) -> None:
        for served in self._models.models():
            self._previous[(served.name, served.version)] = (served.stats, served.stats.snapshot())
            counter = served.hard.counter
            self._previous_hard[(served.name, served.version)] = (counter, counter.snapshot())
        self._shadow_windows()
