"""The batching plan: pure decisions over a measured profile."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from edge_runtime.batching.policy import ProfilePoint, plan_batching, profile_sizes, profiling_done


def points(pairs: list[tuple[int, float]]) -> list[ProfilePoint]:
    return [ProfilePoint(b, lat) for b, lat in pairs]


# Shapes measured on this machine: the digits MLP's latency hardly grows with the batch, the CNN's grows
# faster than linearly on CPU.
TINY_MLP = points([(1, 30e-6), (2, 31e-6), (4, 33e-6), (8, 36e-6), (16, 45e-6), (32, 60e-6)])
CNN_ON_CPU = points([(1, 0.010), (2, 0.021), (4, 0.044), (8, 0.090)])


def test_profile_sizes_are_powers_of_two_up_to_the_cap() -> None:
    assert profile_sizes(1) == [1]
    assert profile_sizes(32) == [1, 2, 4, 8, 16, 32]
    assert profile_sizes(24) == [1, 2, 4, 8, 16, 24]


def test_a_model_that_gains_from_batching_gets_its_best_batch() -> None:
    plan = plan_batching(TINY_MLP, cap=32, configured_delay_s=0.0, slo_s=0.0)
    assert plan.max_batch_size == 32
    assert "batch 32" in plan.reason


def test_a_model_that_batching_slows_is_not_batched() -> None:
    plan = plan_batching(CNN_ON_CPU, cap=32, configured_delay_s=0.005, slo_s=0.0)
    assert plan.max_batch_size == 1
    assert plan.max_queue_delay_s == 0.0
    assert "does not pay" in plan.reason


def test_a_small_gain_from_batching_is_not_worth_its_latency() -> None:
    # mobilenet-bench's profile on this CPU (min of 5 runs): batch 4 looked 14% faster, then served slower.
    measured = points([(1, 1 / 97), (2, 2 / 104), (4, 4 / 111), (8, 8 / 100)])
    plan = plan_batching(measured, cap=32, configured_delay_s=0.005, slo_s=0.0)
    assert (plan.max_batch_size, plan.max_queue_delay_s) == (1, 0.0)
    assert "less than 1.2x" in plan.reason
    # A 25% gain is worth it.
    assert (
        plan_batching(points([(1, 1 / 100), (2, 2 / 125)]), cap=2, configured_delay_s=0.0, slo_s=0.0).max_batch_size
        == 2
    )


def test_the_latency_slo_caps_the_batch_and_the_delay() -> None:
    plan = plan_batching(TINY_MLP, cap=32, configured_delay_s=0.010, slo_s=40e-6)
    assert plan.max_batch_size == 8  # 36 µs fits 40 µs, 16 (45 µs) does not
    assert plan.max_queue_delay_s <= 40e-6 - 36e-6 + 1e-12


def test_no_size_within_the_slo_falls_back_to_batch_one() -> None:
    plan = plan_batching(CNN_ON_CPU, cap=8, configured_delay_s=0.0, slo_s=0.001)
    assert plan.max_batch_size == 1
    assert "SLO" in plan.reason


def test_without_a_profile_the_configuration_stands() -> None:
    plan = plan_batching(None, cap=16, configured_delay_s=0.002, slo_s=0.0)
    assert (plan.max_batch_size, plan.max_queue_delay_s) == (16, 0.002)


def test_a_model_without_a_batch_axis_runs_one_request_at_a_time() -> None:
    plan = plan_batching(TINY_MLP, cap=1, configured_delay_s=0.5, slo_s=0.0)
    assert (plan.max_batch_size, plan.max_queue_delay_s) == (1, 0.0)


def test_profiling_stops_after_two_sizes_without_gain() -> None:
    assert not profiling_done(CNN_ON_CPU[:2], slo_s=0.0, budget_s=1.0)
    assert profiling_done(CNN_ON_CPU[:3], slo_s=0.0, budget_s=1.0)
    assert not profiling_done(TINY_MLP, slo_s=0.0, budget_s=1.0)


def test_profiling_stops_past_the_slo_or_the_budget() -> None:
    assert profiling_done(points([(1, 0.002)]), slo_s=0.001, budget_s=1.0)
    assert profiling_done(points([(1, 2.0)]), slo_s=0.0, budget_s=1.0)


profiles = st.lists(st.floats(min_value=1e-6, max_value=1.0), min_size=1, max_size=8).map(
    lambda lats: [ProfilePoint(2**i, lat) for i, lat in enumerate(lats)]
)


@given(profiles, st.integers(1, 256), st.floats(0, 0.1), st.floats(0, 2.0))
def test_the_plan_always_respects_cap_slo_and_throughput(
    profile: list[ProfilePoint], cap: int, delay: float, slo: float
) -> None:
    plan = plan_batching(profile, cap=cap, configured_delay_s=delay, slo_s=slo)
    assert 1 <= plan.max_batch_size <= cap
    assert 0.0 <= plan.max_queue_delay_s <= max(delay, 0.0)
    fitting = [p for p in profile if p.batch_size <= cap and (slo <= 0 or p.latency_s <= slo)]
    if plan.max_batch_size > 1:
        chosen = next(p for p in profile if p.batch_size == plan.max_batch_size)
        assert slo <= 0 or chosen.latency_s <= slo
        # never more than the noise margin below the best throughput available
        assert chosen.throughput * 1.05 >= max(p.throughput for p in fitting)
        one = [p for p in fitting if p.batch_size == 1]
        assert not one or chosen.throughput >= one[0].throughput * 1.2  # worth its latency
        if slo > 0:
            assert chosen.latency_s + plan.max_queue_delay_s <= slo + 1e-9
