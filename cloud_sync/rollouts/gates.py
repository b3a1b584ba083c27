"""Whether a rollout stage may advance, must wait or must abort: a pure function over plain per-device figures.

`evaluate` sees only what the cloud stores (telemetry windows and reported states, gathered by controller.py);
it reads no clock and no store. Not the loop that acts on the verdict (controller.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from cloud_sync.rollouts.plan import Gates, Mode

__all__ = ["DeviceMetrics", "Verdict", "VersionMetrics", "evaluate", "is_fallback"]

Decision = Literal["advance", "wait", "abort"]
# What a device's reported reason says when the engine it asked for was not the one that loaded
# (edge_runtime/engines: "tensorrt failed: ...", "tensorrt unavailable (...)"; the repository's "fallback").
_FALLBACK_MARKS = ("fallback", "tensorrt failed", "tensorrt unavailable")


@dataclass(frozen=True)
class VersionMetrics:
    """One version's telemetry on one device over the evaluated window (for a SHADOW version: its shadow runs)."""

    requests: int = 0
    errors: int = 0
    p99_ms: float = 0.0
    shadow_compared: int = 0
    shadow_agreed: int = 0


@dataclass(frozen=True)
class DeviceMetrics:
    """A stage device: A's and B's figures (None: no window), and what its reported state says of B."""

    device_id: str
    a: VersionMetrics | None = None
    b: VersionMetrics | None = None
    apply_failed: bool = False
    fallback: bool = False


@dataclass(frozen=True)
class Verdict:
    """`values`: per gate {"value": measured or None (not measurable yet), "threshold", "ok": bool or None}."""

    decision: Decision
    failed_gate: str | None
    values: dict[str, dict[str, Any]]
    reason: str

    def to_json(self) -> dict[str, Any]:
        return {
            "decision": self.decision,
            "failed_gate": self.failed_gate,
            "reason": self.reason,
            "values": self.values,
        }


def is_fallback(reason: str) -> bool:
    """Whether a model status reason says the version serves on a fallback engine."""
    lowered = reason.lower()
    return any(mark in lowered for mark in _FALLBACK_MARKS)


def _entry(value: float | int | None, threshold: float | int | None, ok: bool | None) -> dict[str, Any]:
    return {"value": value, "threshold": threshold, "ok": ok}


def _weighted_p99(found: Sequence[VersionMetrics]) -> float | None:
    requests = sum(m.requests for m in found)
    return sum(m.p99_ms * m.requests for m in found) / requests if requests else None


def _p99_ratio(devices: Sequence[DeviceMetrics]) -> tuple[float | None, int]:
    """B's request-weighted p99 over A's, on the devices where both served requests (and how many B served)."""
    both = [d for d in devices if d.a is not None and d.b is not None and d.a.requests and d.b.requests]
    a = _weighted_p99([d.a for d in both if d.a is not None])
    b = _weighted_p99([d.b for d in both if d.b is not None])
    if a is None or b is None or a <= 0:
        return None, 0
    return b / a, sum(d.b.requests for d in both if d.b is not None)


def _measure(gates: Gates, mode: Mode, devices: Sequence[DeviceMetrics]) -> dict[str, dict[str, Any]]:
    """Every gate's value against its threshold; "ok" None where the gate is off or not measurable yet."""
    bs = [d.b for d in devices if d.b is not None]
    requests = sum(b.requests for b in bs)
    errors = sum(b.errors for b in bs)
    compared = sum(b.shadow_compared for b in bs)
    agreed = sum(b.shadow_agreed for b in bs)
    reporting = sum(1 for b in bs if b.requests > 0)
    needed_devices = min(gates.min_devices, len(devices))  # a stage smaller than min_devices: all of it
    failures = sum(1 for d in devices if d.apply_failed)
    fallbacks = sum(1 for d in devices if d.fallback)
    # In a shadow stage B answers nobody: its "requests" are shadow runs, each gathering up to 16 mirrored rows
    # (edge_runtime/models/shadow.py), so what is counted toward min_requests there is the compared rows.
    seen = compared if mode == "shadow" else requests
    values = {
        "min_devices": _entry(reporting, needed_devices, reporting >= needed_devices if devices else None),
        "min_requests": _entry(seen, gates.min_requests, seen >= gates.min_requests),
        "max_apply_failures": _entry(failures, gates.max_apply_failures, failures <= gates.max_apply_failures),
    }
    enough = requests >= gates.min_requests
    rate = errors / requests if requests else None
    values["max_error_rate"] = _limit(rate, gates.max_error_rate, enough, upper=True)
    ratio, ratio_requests = _p99_ratio(devices)
    if mode == "shadow":
        # B's shadow runs are gathered batches at the lowest priority beside A: their latency says nothing of
        # how B answers a request (a faster B measured 2-4.7x A's p99 there). Judged in the active stages, on the
        # same devices; shown, never decisive, here.
        values["max_p99_ratio"] = _entry(ratio, gates.max_p99_ratio, None)
    else:
        values["max_p99_ratio"] = _limit(ratio, gates.max_p99_ratio, ratio_requests >= gates.min_requests, upper=True)
    if mode == "shadow":
        agreement = agreed / compared if compared else None
        values["min_shadow_agreement"] = _limit(
            agreement, gates.min_shadow_agreement, compared >= gates.min_requests, upper=False
        )
    else:  # B answers itself: nothing is compared in an active stage
        values["min_shadow_agreement"] = _entry(None, gates.min_shadow_agreement, None)
    fallback_rate = fallbacks / len(devices) if devices else None
    values["max_fallback_rate"] = _limit(fallback_rate, gates.max_fallback_rate, bool(devices), upper=True)
    return values


def _limit(value: float | None, threshold: float | None, enough: bool, *, upper: bool) -> dict[str, Any]:
    if threshold is None:
        return _entry(value, None, None)
    if value is None or not enough:
        return _entry(value, threshold, None)
    return _entry(value, threshold, value <= threshold if upper else value >= threshold)


# Gates that abort the moment they fail: each measures something that more time cannot undo once
# min_requests have been seen (the fallback rate counts stage devices, so it only grows).
_BREACHES = ("max_apply_failures", "max_error_rate", "max_p99_ratio", "min_shadow_agreement", "max_fallback_rate")
# Gates that only hold an advance back (more devices and requests come with time).
_WAITS = ("min_devices", "min_requests")


def evaluate(gates: Gates, mode: Mode, devices: Sequence[DeviceMetrics], bake_elapsed: bool) -> Verdict:
    """The verdict on a stage whose devices are `devices` (every device the stage holds, reporting or not).

    abort: a gate is breached (on enough requests), whatever the bake time; advance: the bake time is over,
    every gate that is on passes and min_devices report; else wait.
    """
    values = _measure(gates, mode, devices)
    for name in _BREACHES:
        entry = values[name]
        if entry["ok"] is False:
            comparison = "above" if name.startswith("max_") else "below"
            reason = f"gate {name} failed: {_show(entry['value'])} is {comparison} the threshold {entry['threshold']}"
            return Verdict("abort", name, values, reason)
    for name in _WAITS:
        if values[name]["ok"] is not True:
            entry = values[name]
            return Verdict("wait", None, values, f"waiting for {name}: {entry['value']} of {entry['threshold']}")
    # Not measurable by design, so not waited for: agreement in an active stage (nothing is compared), the p99
    # ratio in a shadow stage (see _measure) and where no stage device has figures of A (devices new to the model).
    moot = {"min_shadow_agreement"} if mode == "active" else {"max_p99_ratio"}
    if not any(d.a is not None and d.a.requests for d in devices):
        moot.add("max_p99_ratio")
    unmeasured = [
        name
        for name in _BREACHES
        if name not in moot and values[name]["threshold"] is not None and values[name]["ok"] is None
    ]
    if unmeasured:
        return Verdict("wait", None, values, f"waiting for figures of {', '.join(unmeasured)}")
    if not bake_elapsed:
        return Verdict("wait", None, values, "every gate passes; baking")
    return Verdict("advance", None, values, "every gate passed after the bake time")


def _show(value: object) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
