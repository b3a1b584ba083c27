"""The gate verdict over plain per-device figures: abort on a clear breach at once, advance only after the bake
time with every gate passing, else wait."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from cloud_sync.rollouts.gates import DeviceMetrics, VersionMetrics, evaluate, is_fallback
from cloud_sync.rollouts.plan import Gates

GATES = Gates(max_error_rate=0.01, max_p99_ratio=1.5, min_shadow_agreement=0.95, min_devices=2, min_requests=100)


def good(device_id: str, mode: str = "active") -> DeviceMetrics:
    compared = 100 if mode == "shadow" else 0
    return DeviceMetrics(
        device_id,
        a=VersionMetrics(requests=1000, errors=0, p99_ms=10.0),
        b=VersionMetrics(requests=100, errors=0, p99_ms=11.0, shadow_compared=compared, shadow_agreed=compared),
    )


def test_healthy_stage_waits_for_the_bake_time_then_advances() -> None:
    devices = [good("a"), good("b")]
    waiting = evaluate(GATES, "active", devices, bake_elapsed=False)
    assert (waiting.decision, waiting.failed_gate) == ("wait", None)
    assert waiting.values["max_p99_ratio"] == {"value": 1.1, "threshold": 1.5, "ok": True}
    assert waiting.values["min_shadow_agreement"]["ok"] is None  # nothing is compared in an active stage
    assert evaluate(GATES, "active", devices, bake_elapsed=True).decision == "advance"


def test_an_error_rate_over_the_limit_aborts_before_the_bake_time_and_names_the_figures() -> None:
    bad = DeviceMetrics("b", a=VersionMetrics(1000, 0, 10.0), b=VersionMetrics(200, 20, 10.0))
    verdict = evaluate(GATES, "active", [good("a"), bad], bake_elapsed=False)
    assert (verdict.decision, verdict.failed_gate) == ("abort", "max_error_rate")
    assert verdict.values["max_error_rate"] == {"value": 20 / 300, "threshold": 0.01, "ok": False}
    assert "max_error_rate" in verdict.reason and "0.01" in verdict.reason


def test_a_slow_candidate_is_judged_against_a_on_the_same_devices() -> None:
    slow = [DeviceMetrics(d, a=VersionMetrics(500, 0, 10.0), b=VersionMetrics(100, 0, 40.0)) for d in ("a", "b")]
    # A third device is fast on A, but has no B: it does not dilute the comparison.
    other = DeviceMetrics("c", a=VersionMetrics(500, 0, 1.0))
    verdict = evaluate(GATES, "active", [*slow, other], bake_elapsed=False)
    assert (verdict.decision, verdict.failed_gate) == ("abort", "max_p99_ratio")
    assert verdict.values["max_p99_ratio"]["value"] == 4.0


def test_a_disagreeing_shadow_aborts_the_shadow_stage() -> None:
    devices = [
        DeviceMetrics(d, a=VersionMetrics(1000, 0, 10.0), b=VersionMetrics(60, 0, 10.0, 60, 30)) for d in ("a", "b")
    ]
    verdict = evaluate(GATES, "shadow", devices, bake_elapsed=False)
    assert (verdict.decision, verdict.failed_gate) == ("abort", "min_shadow_agreement")
    assert verdict.values["min_shadow_agreement"]["value"] == 0.5


def test_in_a_shadow_stage_the_compared_rows_count_and_shadow_latency_never_decides() -> None:
    # A shadow run gathers up to 16 mirrored rows at the lowest priority: 4 runs hold 64 compared rows, and their
    # p99 (here 5x A's) says nothing of how B would answer a request.
    devices = [
        DeviceMetrics(d, a=VersionMetrics(1000, 0, 10.0), b=VersionMetrics(4, 0, 50.0, 64, 64)) for d in ("a", "b")
    ]
    gates = Gates(max_p99_ratio=1.5, min_shadow_agreement=0.95, min_devices=2, min_requests=100)
    verdict = evaluate(gates, "shadow", devices, bake_elapsed=True)
    assert (verdict.decision, verdict.failed_gate) == ("advance", None)
    assert verdict.values["min_requests"] == {"value": 128, "threshold": 100, "ok": True}
    assert verdict.values["max_p99_ratio"] == {"value": 5.0, "threshold": 1.5, "ok": None}
    # The same figures in an active stage: B's own answers, judged.
    active = evaluate(
        gates,
        "active",
        [DeviceMetrics(d, a=VersionMetrics(1000, 0, 10.0), b=VersionMetrics(200, 0, 50.0)) for d in ("a", "b")],
        bake_elapsed=True,
    )
    assert (active.decision, active.failed_gate) == ("abort", "max_p99_ratio")


def test_an_apply_failure_aborts_at_once_and_a_fallback_only_past_its_rate() -> None:
    failed = DeviceMetrics("b", apply_failed=True)
    assert evaluate(GATES, "active", [good("a"), failed], False).failed_gate == "max_apply_failures"
    fell_back = DeviceMetrics("b", a=VersionMetrics(1000, 0, 10.0), b=VersionMetrics(100, 0, 10.0), fallback=True)
    assert evaluate(GATES, "active", [good("a"), fell_back], True).decision == "advance"  # gate off
    strict = Gates(max_fallback_rate=0.25, min_devices=1)
    assert evaluate(strict, "active", [good("a"), fell_back], False).failed_gate == "max_fallback_rate"


def test_too_few_requests_or_devices_waits_rather_than_judging() -> None:
    few = DeviceMetrics("b", a=VersionMetrics(1000, 0, 10.0), b=VersionMetrics(5, 5, 90.0))
    verdict = evaluate(GATES, "active", [few, DeviceMetrics("c")], bake_elapsed=True)
    assert verdict.decision == "wait"
    assert verdict.values["max_error_rate"]["ok"] is None
    one = evaluate(GATES, "active", [good("a"), DeviceMetrics("c")], bake_elapsed=True)
    assert one.decision == "wait" and one.values["min_devices"] == {"value": 1, "threshold": 2, "ok": False}


def test_a_stage_smaller_than_min_devices_needs_all_of_it_and_a_new_model_needs_no_a() -> None:
    lone = DeviceMetrics("a", b=VersionMetrics(500, 0, 10.0))  # no A figures: p99 ratio not measurable
    verdict = evaluate(Gates(max_p99_ratio=1.5, min_devices=5), "active", [lone], bake_elapsed=True)
    assert verdict.decision == "advance"
    assert verdict.values["min_devices"]["threshold"] == 1


def test_fallback_reasons_are_recognised() -> None:
    assert is_fallback("tensorrt failed: out of memory; serving onnxruntime")
    assert is_fallback("tensorrt unavailable (no module named tensorrt)")
    assert not is_fallback("")


versions = st.builds(
    VersionMetrics,
    requests=st.integers(0, 10_000),
    errors=st.integers(0, 100),
    p99_ms=st.floats(0, 1000),
    shadow_compared=st.integers(0, 1000),
    shadow_agreed=st.integers(0, 1000),
)
devices_strategy = st.lists(
    st.builds(
        DeviceMetrics,
        device_id=st.text(min_size=1, max_size=4),
        a=st.none() | versions,
        b=st.none() | versions,
        apply_failed=st.booleans(),
        fallback=st.booleans(),
    ),
    max_size=8,
)
gates_strategy = st.builds(
    Gates,
    max_error_rate=st.none() | st.floats(0, 1),
    max_p99_ratio=st.none() | st.floats(0.1, 10),
    min_shadow_agreement=st.none() | st.floats(0, 1),
    min_devices=st.integers(1, 10),
    max_apply_failures=st.integers(0, 3),
    max_fallback_rate=st.none() | st.floats(0, 1),
    min_requests=st.integers(1, 1000),
)


@given(gates=gates_strategy, mode=st.sampled_from(["shadow", "active"]), devices=devices_strategy, baked=st.booleans())
def test_the_verdict_agrees_with_the_gate_values(
    gates: Gates, mode: str, devices: list[DeviceMetrics], baked: bool
) -> None:
    verdict = evaluate(gates, mode, devices, baked)  # type: ignore[arg-type]
    failed = [
        name for name, entry in verdict.values.items() if entry["ok"] is False and name.startswith(("max", "min_s"))
    ]
    if verdict.decision == "abort":
        assert verdict.failed_gate in failed
    else:
        assert verdict.failed_gate is None and not failed
    if verdict.decision == "advance":
        assert baked
        assert all(entry["ok"] is not False for entry in verdict.values.values())
        assert verdict.values["min_devices"]["ok"] and verdict.values["min_requests"]["ok"]
    # Apply failures past the limit always abort, whatever else the figures say.
    if sum(d.apply_failed for d in devices) > gates.max_apply_failures:
        assert verdict.decision == "abort"


@given(gates=gates_strategy, devices=devices_strategy)
def test_the_bake_time_only_ever_holds_an_advance_back(gates: Gates, devices: list[DeviceMetrics]) -> None:
    early = evaluate(gates, "active", devices, False)
    late = evaluate(gates, "active", devices, True)
    assert early.values == late.values
    assert (early.decision == "abort") == (late.decision == "abort")
    assert early.decision != "advance"
