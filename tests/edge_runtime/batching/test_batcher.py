"""The dynamic batcher with a plain-Python runner: batching, priorities, bounds, timeouts, drain."""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edge_runtime.batching.batcher import DynamicBatcher
from edge_runtime.batching.policy import BatchPlan
from edge_runtime.errors import EngineError, InvalidInput, Overloaded, RequestTimeout, ShuttingDown
from tests.edge_runtime.batching.plain import Recorder, Req
from tests.waiting import wait_for


class GatedRunner:
    """Runs batches when the gate is open; records each batch's request ids."""

    def __init__(self, open_gate: bool = True) -> None:
        self.gate = threading.Event()
        if open_gate:
            self.gate.set()
        self.batches: list[list[int]] = []
        self.threads: list[str] = []
        self.running = 0
        self.max_running = 0
        self._lock = threading.Lock()

    def __call__(self, requests: list[Req]) -> list[tuple[int, int]]:
        with self._lock:
            self.running += 1
            self.max_running = max(self.max_running, self.running)
            self.batches.append([r.ident for r in requests])
            self.threads.append(threading.current_thread().name)
        try:
            assert self.gate.wait(10), "test gate never opened"
            return [(r.ident, len(requests)) for r in requests]
        finally:
            with self._lock:
                self.running -= 1


def make(
    runner: GatedRunner,
    batch: int = 8,
    delay: float = 0.0,
    instances: int = 1,
    depth: int = 100,
    observer: Recorder | None = None,
) -> DynamicBatcher[Req, tuple[int, int]]:
    return DynamicBatcher(
        "test:1",
        runner,
        BatchPlan(batch, delay, "test"),
        instances=instances,
        max_queue_depth=depth,
        observer=observer or Recorder(),
    )


def block_worker(batcher: DynamicBatcher[Req, tuple[int, int]], runner: GatedRunner) -> Future[tuple[int, int]]:
    """Occupy the only worker with a request that waits on the runner's gate."""
    first = batcher.submit(Req(-1))
    wait_for(lambda: runner.running == 1, what="the worker to start the blocking batch")
    return first


requests_strategy = st.lists(
    st.tuples(st.integers(1, 4), st.integers(1, 3), st.sampled_from([None, "a", "b"])),
    min_size=1,
    max_size=60,
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(requests_strategy, st.integers(1, 8), st.integers(1, 3))
def test_every_request_gets_its_own_result_and_batches_stay_within_bounds(
    specs: list[tuple[int, int, str | None]], max_batch: int, instances: int
) -> None:
    runner = GatedRunner(open_gate=False)
    batcher = make(runner, batch=max_batch, instances=instances)
    reqs = [
        Req(i, rows=min(rows, max_batch), priority=prio, group=group) for i, (rows, prio, group) in enumerate(specs)
    ]
    futures = [batcher.submit(r) for r in reqs]
    runner.gate.set()
    results = [f.result(timeout=10) for f in futures]
    batcher.close()
    assert [ident for ident, _ in results] == [r.ident for r in reqs]
    by_id = {r.ident: r for r in reqs}
    assert sorted(i for batch in runner.batches for i in batch) == sorted(by_id)
    for batch in runner.batches:
        assert sum(by_id[i].rows for i in batch) <= max_batch
        assert len({by_id[i].group for i in batch}) == 1


def test_a_backlog_runs_in_batches_and_higher_priority_first() -> None:
    runner = GatedRunner(open_gate=False)
    batcher = make(runner, batch=4)
    blocker = block_worker(batcher, runner)
    low = [batcher.submit(Req(i, priority=2)) for i in range(4)]
    high = [batcher.submit(Req(10 + i, priority=1)) for i in range(4)]
    runner.gate.set()
    for f in [blocker, *low, *high]:
        f.result(timeout=10)
    batcher.close()
    assert runner.batches[1:] == [[10, 11, 12, 13], [0, 1, 2, 3]]


def test_a_full_queue_sheds_with_overloaded_and_counts_it() -> None:
    runner = GatedRunner(open_gate=False)
    observer = Recorder()
    batcher = make(runner, depth=3, observer=observer)
    block_worker(batcher, runner)
    queued = [batcher.submit(Req(i)) for i in range(3)]
    with pytest.raises(Overloaded, match="queue is full"):
        batcher.submit(Req(99))
    assert observer.rejected == ["queue_full"]
    runner.gate.set()
    assert [f.result(timeout=10)[0] for f in queued] == [0, 1, 2]
    batcher.close()


def test_a_request_past_its_deadline_times_out_without_running() -> None:
    runner = GatedRunner(open_gate=False)
    observer = Recorder()
    batcher = make(runner, observer=observer)
    block_worker(batcher, runner)
    expired = batcher.submit(Req(1, deadline=time.monotonic() - 1))
    runner.gate.set()
    with pytest.raises(RequestTimeout):
        expired.result(timeout=10)
    batcher.close()
    assert all(1 not in batch for batch in runner.batches)
    assert "timeout" in observer.rejected


def test_wait_withdraws_a_request_still_queued_at_its_deadline_and_it_counts_once() -> None:
    runner = GatedRunner(open_gate=False)
    observer = Recorder()
    batcher = make(runner, observer=observer)
    block_worker(batcher, runner)
    request = Req(7, deadline=time.monotonic() + 0.05)
    with pytest.raises(RequestTimeout, match="still queued"):
        batcher.wait(batcher.submit(request), request.deadline)
    runner.gate.set()
    batcher.close()
    assert all(7 not in batch for batch in runner.batches)
    assert observer.rejected == ["timeout"]


def test_a_request_its_caller_cancelled_is_counted_and_never_runs() -> None:
    runner = GatedRunner(open_gate=False)
    observer = Recorder()
    batcher = make(runner, observer=observer)
    block_worker(batcher, runner)
    abandoned = batcher.submit(Req(5))
    assert abandoned.cancel()
    runner.gate.set()
    batcher.close()
    assert all(5 not in batch for batch in runner.batches)
    assert observer.rejected == ["cancelled"]


def test_a_failing_batch_fails_only_its_own_requests() -> None:
    calls = []

    def runner(requests: list[Req]) -> list[int]:
        calls.append([r.ident for r in requests])
        if any(r.group == "bad" for r in requests):
            raise ValueError("boom")
        return [r.ident for r in requests]

    observer = Recorder()
    batcher: DynamicBatcher[Req, int] = DynamicBatcher(
        "test:1", runner, BatchPlan(8, 0.0, "t"), instances=1, max_queue_depth=10, observer=observer
    )
    bad = batcher.submit(Req(1, group="bad"))
    good = batcher.submit(Req(2, group="good"))
    with pytest.raises(EngineError, match="inference failed"):
        bad.result(timeout=10)
    assert good.result(timeout=10) == 2
    batcher.close()
    assert (1, 1, False) in observer.batches


def test_our_own_errors_pass_through_unchanged() -> None:
    def runner(requests: list[Req]) -> list[int]:
        raise InvalidInput("engine says no")

    batcher: DynamicBatcher[Req, int] = DynamicBatcher(
        "test:1", runner, BatchPlan(8, 0.0, "t"), instances=1, max_queue_depth=10, observer=Recorder()
    )
    with pytest.raises(InvalidInput, match="engine says no"):
        batcher.run(Req(1))
    with pytest.raises(InvalidInput, match="engine says no"):
        batcher.submit(Req(2)).result(timeout=10)
    batcher.close()


def test_run_uses_the_callers_thread_when_idle_and_the_queue_when_busy() -> None:
    runner = GatedRunner()
    batcher = make(runner)
    assert batcher.run(Req(1)) == (1, 1)
    assert runner.threads[-1] == threading.current_thread().name
    runner.gate.clear()
    block_worker(batcher, runner)
    result: list[tuple[int, int]] = []
    caller = threading.Thread(target=lambda: result.append(batcher.run(Req(2))), name="app-thread")
    caller.start()
    wait_for(lambda: batcher.pending() == 1, what="the second request to queue behind the first")
    runner.gate.set()
    caller.join(10)
    assert result == [(2, 1)]
    assert runner.threads[-1].startswith("engine-test:1")
    batcher.close()


def test_queue_delay_lets_a_batch_fill() -> None:
    runner = GatedRunner()
    batcher = make(runner, batch=3, delay=5.0)
    futures = [batcher.submit(Req(i)) for i in range(3)]
    assert [f.result(timeout=10)[1] for f in futures] == [3, 3, 3]  # one batch, long before 5 s
    batcher.close()


def test_update_adds_instances_live() -> None:
    runner = GatedRunner(open_gate=False)
    batcher = make(runner, batch=1, instances=1)
    first = block_worker(batcher, runner)
    second = batcher.submit(Req(2))
    batcher.update(BatchPlan(1, 0.0, "more"), instances=2, max_queue_depth=100)
    wait_for(lambda: runner.running == 2, what="a second worker to take the queued request")
    runner.gate.set()
    assert first.result(timeout=10)[0] == -1 and second.result(timeout=10)[0] == 2
    assert batcher.plan.reason == "more"
    batcher.close()


def test_close_finishes_queued_work_then_refuses_new_requests() -> None:
    runner = GatedRunner(open_gate=False)
    batcher = make(runner, batch=1)
    futures = [batcher.submit(Req(i)) for i in range(5)]
    closer = threading.Thread(target=batcher.close, kwargs={"timeout": 10})
    closer.start()
    wait_for(lambda: batcher._closing, what="close to begin")
    with pytest.raises(ShuttingDown):
        batcher.submit(Req(99))
    runner.gate.set()
    closer.join(10)
    assert [f.result(timeout=0)[0] for f in futures] == [0, 1, 2, 3, 4]


def test_close_fails_what_it_could_not_finish_in_time() -> None:
    runner = GatedRunner(open_gate=False)
    batcher = make(runner, batch=1)
    block_worker(batcher, runner)
    queued = batcher.submit(Req(1))
    batcher.close(timeout=0.05)
    with pytest.raises(ShuttingDown):
        queued.result(timeout=0)
    runner.gate.set()
