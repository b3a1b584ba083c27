"""How per-device telemetry windows combine into one figure per model version: pure functions, no I/O.

The store sums each device's windows in SQL (DeviceWindows); `combine_device_windows` turns them into the
ModelWindow that rollout gates, fleet metrics and charts read.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["DeviceWindows", "ModelWindow", "combine_device_windows"]


@dataclass(frozen=True)
class DeviceWindows:
    """One device's windows of one model version, summed."""

    device_id: str
    windows: int
    window_s: float  # the time they cover
    requests: int
    errors: int
    inferences: int
    executions: float  # batches run (inferences / mean batch size, per window)
    p99_request_ms: float  # sum over windows of requests x p99
    p99_max_ms: float
    cpu_seconds: float
    energy_joules: float
    shadow_compared: int
    shadow_agreed: int

    @property
    def p99_ms(self) -> float:
        """The device's request-weighted mean of its window p99s."""
        return self.p99_request_ms / self.requests if self.requests else 0.0


@dataclass(frozen=True)
class ModelWindow:
    """One model version across devices and windows.

    p99 from per-window p99s cannot be a true fleet percentile (the histograms are not shipped), so three
    figures are given, and gates use `p99_ms`:
    - `p99_ms`: the worst device's request-weighted mean of its window p99s. A gate on it fails when any one
      device is consistently slow, but not for one bad window on one device.
    - `p99_weighted_ms`: the request-weighted mean of every window p99 (the typical device; for charts).
    - `p99_max_ms`: the single worst window p99 seen (spikes).
    """

    model: str
    version: int
    devices: int  # devices with at least one window
    windows: int
    requests: int
    errors: int
    inferences: int
    p99_ms: float
    p99_weighted_ms: float
    p99_max_ms: float
    mean_batch_size: float
    requests_per_s: float  # the fleet's request rate: the sum over devices of requests / time covered
    cpu_seconds: float
    energy_joules: float
    shadow_compared: int
    shadow_agreed: int

    @property
    def error_rate(self) -> float:
        return self.errors / self.requests if self.requests else 0.0

    @property
    def shadow_agreement(self) -> float:
        return self.shadow_agreed / self.shadow_compared if self.shadow_compared else 0.0

    @property
    def cpu_seconds_per_inference(self) -> float:
        return self.cpu_seconds / self.inferences if self.inferences else 0.0

    @property
    def joules_per_inference(self) -> float:
        return self.energy_joules / self.inferences if self.inferences else 0.0


def combine_device_windows(model: str, version: int, found: Sequence[DeviceWindows]) -> ModelWindow:
    """Combine each device's summed windows (an empty `found` gives a window of zeros)."""
    requests = sum(d.requests for d in found)
    inferences = sum(d.inferences for d in found)
    executions = sum(d.executions for d in found)
    return ModelWindow(
        model=model,
        version=version,
        devices=len(found),
        windows=sum(d.windows for d in found),
        requests=requests,
        errors=sum(d.errors for d in found),
        inferences=inferences,
        p99_ms=max((d.p99_ms for d in found), default=0.0),
        p99_weighted_ms=sum(d.p99_request_ms for d in found) / requests if requests else 0.0,
        p99_max_ms=max((d.p99_max_ms for d in found), default=0.0),
        mean_batch_size=inferences / executions if executions > 0 else 0.0,
        requests_per_s=sum(d.requests / d.window_s for d in found if d.window_s > 0),
        cpu_seconds=sum(d.cpu_seconds for d in found),
        energy_joules=sum(d.energy_joules for d in found),
        shadow_compared=sum(d.shadow_compared for d in found),
        shadow_agreed=sum(d.shadow_agreed for d in found),
    )
