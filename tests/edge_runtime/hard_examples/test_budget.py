"""The hard-example byte budget: per window, rolling over, refunds, exact under concurrent takers."""

from __future__ import annotations

import threading

from hypothesis import given
from hypothesis import strategies as st

from edge_runtime.inference.hard import ByteBudget


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_takes_fit_until_the_window_is_spent_then_the_next_window_starts_empty() -> None:
    clock = Clock()
    budget = ByteBudget(1000, 60.0, clock)
    assert budget.take(600) and budget.take(400)
    assert not budget.take(1)  # spent
    clock.now += 59.9
    assert not budget.take(1)
    clock.now += 0.1  # 60 s after the window began
    assert budget.take(1000) and budget.used == 1000
    assert not budget.take(1)


def test_a_record_larger_than_the_whole_budget_never_fits() -> None:
    budget = ByteBudget(1000, 60.0, Clock())
    assert not budget.take(1001)
    assert budget.used == 0 and budget.take(1000)


def test_bytes_given_back_can_be_taken_again() -> None:
    budget = ByteBudget(1000, 60.0, Clock())
    assert budget.take(800)
    budget.give_back(800)
    assert budget.take(1000)


def test_new_limits_apply_at_once_and_what_was_used_still_counts() -> None:
    clock = Clock()
    budget = ByteBudget(1000, 60.0, clock)
    assert budget.take(700)
    budget.set_limits(500, 10.0)
    assert not budget.take(1)
    clock.now += 10
    assert budget.take(500) and not budget.take(1)
    budget.set_limits(0, 10.0)  # off
    clock.now += 10
    assert not budget.take(1)


@given(st.lists(st.integers(0, 400), max_size=60), st.integers(0, 5000))
def test_what_is_taken_never_passes_the_limit_and_only_takes_that_would_pass_it_fail(
    sizes: list[int], limit: int
) -> None:
    budget = ByteBudget(limit, 60.0, Clock())
    used = 0
    for size in sizes:
        fits = used + size <= limit
        assert budget.take(size) == fits
        used += size if fits else 0
    assert budget.used == used <= limit


def test_concurrent_takers_get_exactly_the_budget() -> None:
    budget = ByteBudget(10_000, 3600.0)
    taken: list[int] = []
    lock = threading.Lock()
    start = threading.Barrier(8)

    def taker() -> None:
        start.wait()
        mine = sum(7 for _ in range(1000) if budget.take(7))
        with lock:
            taken.append(mine)

    threads = [threading.Thread(target=taker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert sum(taken) == budget.used == 10_000 // 7 * 7  # every byte accounted once, none past the limit
