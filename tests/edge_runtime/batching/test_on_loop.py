"""The batcher "on the loop": a model whose batches are cheaper than a thread hop is drained by the event loop.

Real asyncio loops throughout (asyncio.run, or tests/loopcheck.py's LoopThread for a loop on another thread)
and a runner that records the thread each batch ran on. Then the plan that decides it (plan_batching,
ServedModel._plan with the real digits package), ModelRepository.attach_loop, and LoopBridge's pass-through.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge_runtime.batching import batcher as batcher_module
from edge_runtime.batching.batcher import ON_LOOP_GIVE_UP_S, SLOW_BATCHES_TO_LEAVE, DynamicBatcher, Outcome
from edge_runtime.batching.policy import ON_LOOP_LIMIT_S, BatchPlan, ProfilePoint, plan_batching
from edge_runtime.config import AgentConfig
from edge_runtime.errors import EngineError, InvalidInput, RequestTimeout, ShuttingDown
from edge_runtime.inference.types import InferRequest, InferResponse
from edge_runtime.loop_bridge import LoopBridge
from edge_runtime.models.package import read_package
from edge_runtime.models.repository import ModelRepository
from edge_runtime.models.served import LoadContext, ServedModel
from edge_runtime.observability.metrics import AgentMetrics
from tests.edge_runtime.batching.plain import Recorder, Req
from tests.loopcheck import LoopThread
from tests.waiting import wait_for

# -- a plain batcher -------------------------------------------------------------------------------------


@dataclass
class Runner:
    """Answers ident * 10; records each batch's idents and the thread it ran on.

    `fail`: idents whose batch raises ValueError; `invalid`: idents whose batch raises InvalidInput;
    `slow`: idents whose batch takes `slow_s` (spent computing, as a slow engine would); `gate`: idents whose
    batch waits for `gate_open`.
    """

    fail: set[int] = field(default_factory=set)
    invalid: set[int] = field(default_factory=set)
    slow: set[int] = field(default_factory=set)
    slow_s: float = 0.0
    gate: set[int] = field(default_factory=set)
    gate_open: threading.Event = field(default_factory=threading.Event)
    batches: list[list[int]] = field(default_factory=list)
    threads: list[int] = field(default_factory=list)

    def __call__(self, requests: list[Req]) -> list[int]:
        idents = [r.ident for r in requests]
        self.batches.append(idents)
        self.threads.append(threading.get_ident())
        if self.gate & set(idents):
            assert self.gate_open.wait(10), "test gate never opened"
        if self.slow & set(idents):
            until = time.monotonic() + self.slow_s
            while time.monotonic() < until:
                pass
        if self.fail & set(idents):
            raise ValueError("engine blew up")
        if self.invalid & set(idents):
            raise InvalidInput("bad tensor")
        return [i * 10 for i in idents]

    def thread_of(self, ident: int) -> int:
        return next(t for batch, t in zip(self.batches, self.threads, strict=True) if ident in batch)


ON_LOOP = BatchPlan(8, 0.0, "test", on_loop=True)


def make(
    runner: Runner,
    loop: asyncio.AbstractEventLoop | None,
    plan: BatchPlan = ON_LOOP,
    instances: int = 1,
    observer: Recorder | None = None,
) -> DynamicBatcher[Req, int]:
    return DynamicBatcher(
        "test:1", runner, plan, instances=instances, max_queue_depth=100, observer=observer or Recorder(), loop=loop
    )


async def outcome(future: Outcome[int]) -> int:
    """Await either kind of future on the running loop."""
    if isinstance(future, Future):
        return await asyncio.wrap_future(future)
    return await future


def on_loop_future(future: Outcome[int]) -> asyncio.Future[int]:
    """`future`, which must be the asyncio kind (the caller was on the loop, the model runs there)."""
    assert isinstance(future, asyncio.Future), future
    return future


def thread_future(future: Outcome[int]) -> Future[int]:
    """`future`, which must be the concurrent kind (the caller was off the loop, or the model is)."""
    assert isinstance(future, Future), future
    return future


def prime(batcher: DynamicBatcher[Req, int], ident: int) -> asyncio.Future[int]:
    """Queue request `ident` with plain submit(): it never runs inline, so the submit_awaitable calls after it
    in the same loop iteration queue behind it (a loop caller with a free instance and an empty queue runs at
    once, inside submit_awaitable)."""
    return asyncio.wrap_future(batcher.submit(Req(ident)))


async def warm(batcher: DynamicBatcher[Req, int], ident: int = 1000) -> None:
    """One request through the loop, so the batcher knows the loop's thread (submit_awaitable needs it)."""
    assert await outcome(batcher.submit_awaitable(Req(ident))) == ident * 10


@pytest.fixture(autouse=True)
def patient_give_up(monkeypatch: pytest.MonkeyPatch) -> None:
    """ON_LOOP_GIVE_UP_S is wall time (2 ms): on this shared 2-core box a trivial batch is sometimes descheduled
    that long, and its model would leave the loop mid-test. Tests that mean to see it leave set their own."""
    monkeypatch.setattr(batcher_module, "ON_LOOP_GIVE_UP_S", 5.0)


@pytest.fixture
def loop_thread() -> Iterator[LoopThread]:
    thread = LoopThread("test-on-loop")
    yield thread
    thread.close()
    # A test that held the loop on purpose (block()) is judged by blocking calls alone, not by time.
    found = thread.calls if id(thread) in _HELD else thread.blocking()
    _HELD.discard(id(thread))
    assert not found, found


_HELD: set[int] = set()


def block(loop_thread: LoopThread) -> threading.Event:
    """Hold `loop_thread`'s loop in a callback until the returned event is set (the test's own doing)."""
    release, holding = threading.Event(), threading.Event()

    def hold() -> None:
        holding.set()
        release.wait(10)

    _HELD.add(id(loop_thread))
    loop_thread.loop.call_soon_threadsafe(hold)
    assert holding.wait(10)
    return release


# -- on the loop's own thread ----------------------------------------------------------------------------


def test_a_lone_request_on_the_loop_runs_inside_submit_awaitable() -> None:
    runner, observer = Runner(), Recorder()

    async def main() -> None:
        batcher = make(runner, asyncio.get_running_loop(), observer=observer)
        await warm(batcher)
        future = on_loop_future(batcher.submit_awaitable(Req(1)))
        assert future.done() and future.result() == 10  # ran before submit_awaitable returned
        failing = make(Runner(fail={2}), asyncio.get_running_loop())
        await warm(failing)
        failed = on_loop_future(failing.submit_awaitable(Req(2)))
        assert failed.done() and isinstance(failed.exception(), EngineError)  # the error rides the future
        failing.close()
        batcher.close()

    asyncio.run(main())
    assert runner.batches == [[1000], [1]]
    assert set(runner.threads) == {threading.get_ident()}
    assert observer.batches[1] == (1, 1, True)


def test_requests_of_one_iteration_queued_behind_another_run_as_one_batch_on_the_loop_thread() -> None:
    runner, observer = Runner(), Recorder()

    async def main() -> None:
        batcher = make(runner, asyncio.get_running_loop(), observer=observer)
        assert batcher.on_loop
        await warm(batcher)
        # No await between them: one loop iteration, the first queued with submit().
        futures = [prime(batcher, 0)] + [on_loop_future(batcher.submit_awaitable(Req(i))) for i in range(1, 8)]
        assert await asyncio.gather(*futures) == [i * 10 for i in range(8)]
        assert runner.batches == [[1000], list(range(8))]
        assert set(runner.threads) == {threading.get_ident()}
        # More than a batch holds: the rest follow in later drains, still on the loop.
        more = [prime(batcher, 100)] + [on_loop_future(batcher.submit_awaitable(Req(i))) for i in range(101, 120)]
        assert await asyncio.gather(*more) == [i * 10 for i in range(100, 120)]
        assert [len(b) for b in runner.batches[2:]] == [8, 8, 4]
        assert set(runner.threads) == {threading.get_ident()}
        batcher.close()

    asyncio.run(main())
    assert observer.batches[1] == (8, 8, True)
    assert observer.rejected == []


def test_results_and_errors_reach_their_own_callers_and_a_failing_batch_fails_only_itself() -> None:
    runner = Runner(fail={3}, invalid={6})
    plan = BatchPlan(2, 0.0, "test", on_loop=True)

    async def main() -> None:
        batcher = make(runner, asyncio.get_running_loop(), plan)
        await warm(batcher)
        # Batches [0,1] [2,3] [4,5] [6,7].
        futures = [prime(batcher, 0)] + [on_loop_future(batcher.submit_awaitable(Req(i))) for i in range(1, 8)]
        results = await asyncio.gather(*futures, return_exceptions=True)
        batcher.close()
        assert runner.batches[1:] == [[0, 1], [2, 3], [4, 5], [6, 7]]
        assert results[0:2] == [0, 10]
        assert all(isinstance(r, EngineError) for r in results[2:4])
        assert results[4:6] == [40, 50]
        assert all(isinstance(r, InvalidInput) and str(r) == "bad tensor" for r in results[6:8])
        assert set(runner.threads) == {threading.get_ident()}

    asyncio.run(main())


def test_a_request_withdrawn_before_its_drain_never_runs_and_counts_as_cancelled() -> None:
    runner, observer = Runner(), Recorder()

    async def main() -> None:
        batcher = make(runner, asyncio.get_running_loop(), observer=observer)
        await warm(batcher)
        first = prime(batcher, 0)
        gone, kept = batcher.submit_awaitable(Req(1)), batcher.submit_awaitable(Req(2))
        assert isinstance(gone, asyncio.Future)
        gone.cancel()  # the caller went away in the same iteration
        assert await outcome(kept) == 20
        assert await first == 0
        batcher.close()

    asyncio.run(main())
    assert runner.batches == [[1000], [0, 2]]
    assert observer.rejected == ["cancelled"]


def test_cancelling_the_awaiting_task_withdraws_its_request() -> None:
    runner, observer = Runner(), Recorder()
    # A queue delay holds the drain back, so the task is cancelled while its request is queued.
    plan = BatchPlan(8, 0.05, "test", on_loop=True)

    async def main() -> None:
        batcher = make(runner, asyncio.get_running_loop(), plan, observer=observer)
        await warm(batcher)
        awaiting = asyncio.get_running_loop().create_future()

        async def client() -> int:
            future = batcher.submit_awaitable(Req(1))
            assert isinstance(future, asyncio.Future)
            awaiting.set_result(None)
            return await future

        task = asyncio.ensure_future(client())
        await awaiting
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert await outcome(batcher.submit_awaitable(Req(2))) == 20  # drained with (after) the withdrawn one
        batcher.close()

    asyncio.run(main())
    assert runner.batches == [[1000], [2]]
    assert observer.rejected == ["cancelled"]


def test_a_request_past_its_deadline_fails_with_request_timeout_and_never_runs() -> None:
    runner, observer = Runner(), Recorder()

    async def main() -> None:
        batcher = make(runner, asyncio.get_running_loop(), observer=observer)
        await warm(batcher)
        first = prime(batcher, 0)
        late = batcher.submit_awaitable(Req(1, deadline=time.monotonic() - 1))
        on_time = batcher.submit_awaitable(Req(2, deadline=time.monotonic() + 30))
        with pytest.raises(RequestTimeout, match="past its timeout"):
            await outcome(late)
        assert await outcome(on_time) == 20
        assert await first == 0
        batcher.close()

    asyncio.run(main())
    assert runner.batches == [[1000], [0, 2]]
    assert observer.rejected == ["timeout"]


def test_batches_that_hold_the_loop_too_long_move_the_model_to_engine_threads(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert pytest.approx(10 * ON_LOOP_LIMIT_S) == ON_LOOP_GIVE_UP_S  # the real limit, replaced below
    # Far above what a trivial batch takes on a busy box; far below what the slow ones take.
    monkeypatch.setattr(batcher_module, "ON_LOOP_GIVE_UP_S", 0.05)
    slow = set(range(1, SLOW_BATCHES_TO_LEAVE + 1))
    runner = Runner(slow=slow, slow_s=0.1)
    plan = BatchPlan(1, 0.0, "profiled fast", on_loop=True)

    async def main() -> None:
        loop_thread = threading.get_ident()
        batcher = make(runner, asyncio.get_running_loop(), plan)
        await warm(batcher)
        for value in sorted(slow)[:-1]:  # one slow batch short of leaving: still on the loop
            assert await outcome(batcher.submit_awaitable(Req(value))) == value * 10
            assert batcher.on_loop
        last, queued = batcher.submit_awaitable(Req(max(slow))), batcher.submit_awaitable(Req(100))
        assert await outcome(last) == max(slow) * 10
        assert await outcome(queued) == 1000  # queued behind it on the loop, finished by an engine thread
        assert not batcher.on_loop and not batcher.plan.on_loop
        assert batcher.plan.reason.startswith("profiled fast; moved to engine threads: a batch held the event loop")
        after = batcher.submit_awaitable(Req(3000))
        assert isinstance(after, Future)
        assert await outcome(after) == 30000
        batcher.close()
        assert {runner.thread_of(v) for v in slow} == {loop_thread}
        assert runner.thread_of(100) != loop_thread
        assert runner.thread_of(3000) != loop_thread

    asyncio.run(main())


def test_one_slow_batch_on_the_loop_is_not_enough_to_leave_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(batcher_module, "ON_LOOP_GIVE_UP_S", 0.05)
    runner = Runner(slow={1}, slow_s=0.1)

    async def main() -> None:
        batcher = make(runner, asyncio.get_running_loop(), BatchPlan(1, 0.0, "test", on_loop=True))
        await warm(batcher)
        assert await outcome(batcher.submit_awaitable(Req(1))) == 10
        assert await outcome(batcher.submit_awaitable(Req(2))) == 20
        assert batcher.on_loop and batcher.plan.reason == "test"
        assert runner.thread_of(2) == threading.get_ident()
        batcher.close()

    asyncio.run(main())


def test_a_fast_batch_keeps_the_model_on_the_loop() -> None:
    runner = Runner()

    async def main() -> None:
        batcher = make(runner, asyncio.get_running_loop(), BatchPlan(1, 0.0, "test", on_loop=True))
        await warm(batcher)
        assert await asyncio.gather(*[outcome(batcher.submit_awaitable(Req(i))) for i in range(20)]) == [
            i * 10 for i in range(20)
        ]
        assert batcher.plan.on_loop and batcher.plan.reason == "test"
        assert set(runner.threads) == {threading.get_ident()}
        batcher.close()

    asyncio.run(main())


def test_close_on_the_loop_with_queued_requests_finishes_or_fails_them_all() -> None:
    runner = Runner()

    async def main() -> None:
        batcher = make(runner, asyncio.get_running_loop())
        await warm(batcher)
        futures = [prime(batcher, 0)] + [on_loop_future(batcher.submit_awaitable(Req(i))) for i in range(1, 20)]
        batcher.close(timeout=10)  # on the loop, before any drain: the engine threads take the queue
        results = await asyncio.wait_for(asyncio.gather(*futures, return_exceptions=True), 10)
        for i, result in enumerate(results):
            assert result == i * 10 or isinstance(result, ShuttingDown), result
        ran = [i for batch in runner.batches[1:] for i in batch]
        assert sorted(ran) == [i for i, r in enumerate(results) if r == i * 10]  # each ran once, answered
        with pytest.raises(ShuttingDown):
            batcher.submit_awaitable(Req(99))

    asyncio.run(main())
    assert all(t != threading.get_ident() for t in runner.threads[1:])


def test_detaching_on_the_loop_hands_its_queued_awaitables_to_the_engine_threads() -> None:
    runner = Runner()

    async def main() -> None:
        batcher = make(runner, asyncio.get_running_loop())
        await warm(batcher)
        futures = [prime(batcher, 0)] + [on_loop_future(batcher.submit_awaitable(Req(i))) for i in range(1, 10)]
        batcher.attach_loop(None)  # as InferenceServer.stop does, on the loop, before the drain ran
        assert not batcher.on_loop
        assert await asyncio.wait_for(asyncio.gather(*futures), 10) == [i * 10 for i in range(10)]
        assert all(runner.thread_of(i) != threading.get_ident() for i in range(10))
        assert isinstance(batcher.submit_awaitable(Req(11)), Future)
        batcher.close()

    asyncio.run(main())


# -- another thread, a loop on its own thread ------------------------------------------------------------


@pytest.mark.parametrize("delay", [0.0, 0.01])
def test_a_request_from_another_thread_is_drained_on_the_loop(loop_thread: LoopThread, delay: float) -> None:
    runner = Runner()
    batcher = make(runner, loop_thread.loop, BatchPlan(8, delay, "test", on_loop=True))
    # Not on the loop's thread: concurrent futures.
    futures = [thread_future(batcher.submit_awaitable(Req(i))) for i in range(5)]
    assert [f.result(10) for f in futures] == [i * 10 for i in range(5)]
    assert batcher.submit(Req(9)).result(10) == 90
    assert set(runner.threads) == {loop_thread.thread.ident}
    batcher.close()


def test_close_from_another_thread_with_queued_requests_hangs_nothing(loop_thread: LoopThread) -> None:
    runner = Runner()
    batcher = make(runner, loop_thread.loop)
    release = block(loop_thread)  # the drain the submits schedule cannot run yet
    try:
        futures = [batcher.submit(Req(i)) for i in range(10)]
        closed = threading.Thread(target=batcher.close, args=(10,))
        closed.start()
        closed.join(15)
        assert not closed.is_alive(), "close() hung"
        for i, future in enumerate(futures):
            assert future.done()
            error = future.exception(0)
            assert (error is None and future.result(0) == i * 10) or isinstance(error, ShuttingDown), error
        with pytest.raises(ShuttingDown):
            batcher.submit(Req(99))
    finally:
        release.set()
    assert loop_thread.thread.ident not in runner.threads


def test_detaching_the_loop_hands_queued_requests_to_the_engine_threads(loop_thread: LoopThread) -> None:
    runner = Runner()
    batcher = make(runner, loop_thread.loop)
    release = block(loop_thread)
    try:
        futures = [batcher.submit(Req(i)) for i in range(10)]
        batcher.attach_loop(None)
        assert not batcher.on_loop
        # Answered while the loop is still held: the engine threads ran them.
        assert [f.result(10) for f in futures] == [i * 10 for i in range(10)]
    finally:
        release.set()
    assert loop_thread.thread.ident not in runner.threads
    assert thread_future(batcher.submit_awaitable(Req(20))).result(10) == 200
    batcher.close()


def test_a_plan_off_the_loop_never_touches_the_loop(loop_thread: LoopThread) -> None:
    runner = Runner()
    batcher = make(runner, loop_thread.loop, BatchPlan(8, 0.0, "test", on_loop=False))
    assert not batcher.on_loop
    release = block(loop_thread)
    try:
        # Answered while the loop is held: nothing of theirs waits on it.
        assert [batcher.submit(Req(i)).result(10) for i in range(5)] == [i * 10 for i in range(5)]
    finally:
        release.set()
    on_loop_thread = loop_thread.run(_submit_on_loop(batcher, Req(7)))
    assert on_loop_thread == (False, 70)
    assert loop_thread.thread.ident not in runner.threads
    batcher.close()


async def _submit_on_loop(batcher: DynamicBatcher[Req, int], request: Req) -> tuple[bool, int]:
    """submit_awaitable on the loop: (whether it gave an asyncio future, the result)."""
    future = batcher.submit_awaitable(request)
    return isinstance(future, asyncio.Future), await outcome(future)


def test_an_inline_run_holding_the_only_instance_hands_the_queue_to_the_loop_when_done(
    loop_thread: LoopThread,
) -> None:
    runner = Runner(gate={1})
    batcher = make(runner, loop_thread.loop)
    inline: Future[int] = Future()

    def in_process() -> None:
        inline.set_result(batcher.run(Req(1)))

    caller = threading.Thread(target=in_process)
    caller.start()
    wait_for(lambda: runner.batches == [[1]], what="the inline run to start")
    assert runner.threads == [caller.ident]
    queued = asyncio.run_coroutine_threadsafe(_submit_on_loop(batcher, Req(2)), loop_thread.loop)
    wait_for(lambda: batcher.pending() == 1, what="request 2 to be queued")
    runner.gate_open.set()
    assert inline.result(10) == 10
    assert queued.result(10)[1] == 20
    caller.join(10)
    assert runner.thread_of(2) == loop_thread.thread.ident
    batcher.close()


def test_requests_queued_behind_a_thread_batch_run_when_the_plan_moves_onto_the_loop(loop_thread: LoopThread) -> None:
    runner = Runner(gate={1})
    batcher = make(runner, loop_thread.loop, BatchPlan(1, 0.0, "threads", on_loop=False))
    try:
        first = batcher.submit(Req(1))
        wait_for(lambda: runner.batches == [[1]], what="the engine thread to start request 1")
        second = batcher.submit(Req(2))  # queued behind it
        batcher.update(BatchPlan(1, 0.0, "loop", on_loop=True), instances=1, max_queue_depth=100)
        loop_thread.call(lambda: None)  # FIFO: the drain update() scheduled has run (and found the slot busy)
        runner.gate_open.set()
        assert first.result(10) == 10
        assert second.result(5) == 20
    finally:
        runner.gate_open.set()
        batcher.close()  # closing hands the stranded request to the workers, so nothing is left hanging


def test_a_new_loop_drains_after_the_old_one_died_with_a_drain_pending(loop_thread: LoopThread) -> None:
    runner = Runner()
    old = asyncio.new_event_loop()  # never runs: the drain scheduled on it never happens
    batcher = make(runner, old)
    try:
        first = batcher.submit(Req(1))
        batcher.attach_loop(None)  # as InferenceServer.stop does: the engine threads finish it
        assert first.result(10) == 10
        old.close()
        batcher.attach_loop(loop_thread.loop)  # a new server on a new loop
        assert batcher.on_loop
        assert batcher.submit(Req(2)).result(5) == 20
        assert runner.thread_of(2) == loop_thread.thread.ident
    finally:
        batcher.close()


# -- the plan --------------------------------------------------------------------------------------------

points = st.lists(
    st.builds(ProfilePoint, st.sampled_from([1, 2, 4, 8, 16, 32]), st.floats(1e-6, 5e-3)),
    min_size=1,
    max_size=6,
    unique_by=lambda p: p.batch_size,
).map(lambda ps: sorted(ps, key=lambda p: p.batch_size))


@settings(max_examples=200, deadline=None)
@given(points, st.integers(1, 64), st.floats(0, 0.01), st.sampled_from([0.0, 1e-4, 1e-3, 0.01]))
def test_plan_goes_on_the_loop_only_when_allowed_and_the_chosen_batch_fits_the_limit(
    profile: list[ProfilePoint], cap: int, delay: float, slo: float
) -> None:
    denied = plan_batching(profile, cap=cap, configured_delay_s=delay, slo_s=slo, on_loop_allowed=False)
    assert not denied.on_loop and "event loop" not in denied.reason
    allowed = plan_batching(profile, cap=cap, configured_delay_s=delay, slo_s=slo, on_loop_allowed=True)
    # The same batching either way; only where it runs differs.
    assert (allowed.max_batch_size, allowed.max_queue_delay_s) == (denied.max_batch_size, denied.max_queue_delay_s)
    chosen = next((p for p in profile if p.batch_size == allowed.max_batch_size), None)
    expected = cap > 1 and chosen is not None and chosen.latency_s <= ON_LOOP_LIMIT_S
    if expected and slo > 0 and chosen is not None and chosen.latency_s > slo:
        expected = False
    assert allowed.on_loop == expected, (allowed, chosen)
    assert ("on the event loop" in allowed.reason) == allowed.on_loop


def test_plan_on_the_loop_for_a_fast_profile_and_never_without_one() -> None:
    fast = [ProfilePoint(1, 20e-6), ProfilePoint(2, 30e-6), ProfilePoint(4, 50e-6)]
    plan = plan_batching(fast, cap=4, configured_delay_s=0.0, slo_s=0.0, on_loop_allowed=True)
    assert plan.on_loop and plan.max_batch_size == 4
    assert "on the event loop (a batch takes 50 µs)" in plan.reason
    assert not plan_batching(fast, cap=4, configured_delay_s=0.0, slo_s=0.0).on_loop  # the default: not allowed
    slow = [ProfilePoint(1, 2 * ON_LOOP_LIMIT_S)]
    assert not plan_batching(slow, cap=4, configured_delay_s=0.0, slo_s=0.0, on_loop_allowed=True).on_loop
    assert not plan_batching(None, cap=4, configured_delay_s=0.0, slo_s=0.0, on_loop_allowed=True).on_loop


# -- a real model: ServedModel and ModelRepository --------------------------------------------------------

FAST_PROFILE = [ProfilePoint(1, 10e-6), ProfilePoint(2, 12e-6), ProfilePoint(4, 15e-6)]


def record_engine_threads(served: ServedModel, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The threads the real engine of `served` runs on, from now on."""
    threads: list[int] = []
    run = served.engine.run

    def recording(*args: Any, **kwargs: Any) -> Any:
        threads.append(threading.get_ident())
        return run(*args, **kwargs)

    monkeypatch.setattr(served.engine, "run", recording)
    return threads


def with_fast_profile(served: ServedModel) -> None:
    """Plan `served` as if its profile said batches take microseconds (this box's real profile varies)."""
    served.profile = list(FAST_PROFILE)
    served.apply_policy(served.policy)


@pytest.fixture(scope="module")
def varying_package(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model whose non-batch axis varies: x [batch, n] -> y = x (Identity)."""
    from onnx import TensorProto, helper

    from edge_runtime.inference.tensors import TensorSpec
    from edge_runtime.models.package import write_package

    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "same",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "n"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "n"])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    package = write_package(
        tmp_path_factory.mktemp("same") / "same" / "1",
        model.SerializeToString(),
        name="same",
        version=1,
        inputs=[TensorSpec("x", "FP32", (-1, -1))],
        outputs=[TensorSpec("y", "FP32", (-1, -1))],
        max_batch_size=8,
    )
    return package.directory


def load_served(package: Path, config: AgentConfig, loop: asyncio.AbstractEventLoop, tmp_path: Path) -> ServedModel:
    ctx = LoadContext(
        engine=config.engine,
        policy=config.inference,
        max_request_bytes=config.server.max_request_bytes,
        cache_dir=tmp_path / "cache",
        metrics=AgentMetrics(),
        loop=loop,
    )
    return ServedModel.load(read_package(package), ctx)


@pytest.mark.parametrize(
    ("model", "run_on_loop", "expected"),
    [("digits", True, True), ("digits", False, False), ("varying", True, False)],
)
def test_served_model_runs_on_the_loop_only_with_fixed_shapes_and_run_on_loop(
    model: str,
    run_on_loop: bool,
    expected: bool,
    model_packages: dict[str, Path],
    varying_package: Path,
    make_config: Callable[..., AgentConfig],
    loop_thread: LoopThread,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    config = make_config(inference={"run_on_loop": run_on_loop})
    package = model_packages["digits:1"] if model == "digits" else varying_package
    served = load_served(package, config, loop_thread.loop, tmp_path)
    try:
        with_fast_profile(served)
        assert served.batcher.plan.on_loop is expected, served.batcher.plan
        assert served.batcher.on_loop is expected
        threads = record_engine_threads(served, monkeypatch)
        inputs = {"pixels": np.zeros((2, 64), np.float32)} if model == "digits" else {"x": np.ones((2, 3), np.float32)}

        async def infer() -> InferResponse:
            await _any(served.batcher.submit_awaitable(served.prepare(InferRequest(served.name, inputs))))
            return await _any(served.batcher.submit_awaitable(served.prepare(InferRequest(served.name, inputs))))

        response = loop_thread.run(infer())
        assert next(iter(response.outputs.values())).shape[0] == 2
        assert len(threads) == 2
        assert (threads[-1] == loop_thread.thread.ident) is expected
        assert (threads[0] == loop_thread.thread.ident) is expected
    finally:
        served.close(5.0)


async def _any(future: Outcome[InferResponse]) -> InferResponse:
    if isinstance(future, Future):
        return await asyncio.wrap_future(future)
    return await future


@pytest.mark.parametrize("run_on_loop", [True, False])
def test_repository_attach_loop_puts_its_models_on_the_loop_per_policy(
    run_on_loop: bool,
    model_packages: dict[str, Path],
    make_config: Callable[..., AgentConfig],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    repo = ModelRepository(make_config(inference={"run_on_loop": run_on_loop}))
    try:
        repo.install(model_packages["digits:1"])
        served = repo.model("digits")
        with_fast_profile(served)
        threads = record_engine_threads(served, monkeypatch)
        pixels = np.zeros((1, 64), np.float32)

        async def main() -> tuple[bool, bool, int]:
            repo.attach_loop(asyncio.get_running_loop())
            on_loop = served.batcher.on_loop
            _, first = repo.submit_awaitable(InferRequest("digits", {"pixels": pixels}))
            await _any(first)
            _, second = repo.submit_awaitable(InferRequest("digits", {"pixels": pixels}))
            await _any(second)
            repo.attach_loop(None)
            return on_loop, isinstance(second, asyncio.Future), threading.get_ident()

        on_loop, awaitable, loop_ident = asyncio.run(main())
        assert on_loop is run_on_loop
        assert awaitable is run_on_loop
        assert (set(threads) == {loop_ident}) is run_on_loop
        assert not served.batcher.on_loop  # detached
        # Detached, the model still answers (on its engine threads).
        _, detached = repo.submit(InferRequest("digits", {"pixels": pixels}))
        assert detached.result(10).outputs["probabilities"].shape == (1, 10)
        assert threading.current_thread().ident == loop_ident  # asyncio.run's loop ran on this thread
        assert threads[-1] != loop_ident
    finally:
        repo.close()


@pytest.mark.parametrize(
    "attached",
    [
        "before",
        "during",
    ],
)
def test_a_version_prepared_while_the_loop_is_attached_runs_on_it(
    attached: str,
    model_packages: dict[str, Path],
    make_config: Callable[..., AgentConfig],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    repo = ModelRepository(make_config())
    loop = asyncio.new_event_loop()  # only its identity matters here: nothing is submitted
    try:
        repo.install(model_packages["digits:1"], activate=False)
        if attached == "before":
            repo.attach_loop(loop)
        else:
            load = ServedModel.load

            def load_while_the_server_starts(package: Any, ctx: LoadContext) -> ServedModel:
                served = load(package, ctx)
                repo.attach_loop(loop)  # InferenceServer.start, while this version was still building
                return served

            monkeypatch.setattr(ServedModel, "load", load_while_the_server_starts)
        served = repo.prepare("digits", 1)
        with_fast_profile(served)
        assert served.batcher.on_loop
    finally:
        repo.close()
        loop.close()


# -- LoopBridge ------------------------------------------------------------------------------------------


def test_loop_bridge_passes_an_asyncio_future_through_and_settles_on_its_own_thread_at_once() -> None:
    async def main() -> None:
        bridge = LoopBridge(asyncio.get_running_loop())
        own: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        assert bridge.wrap(own) is own
        # A concurrent future completed on the loop's thread (a batch the loop ran) settles its view at once.
        done_here: concurrent.futures.Future[int] = concurrent.futures.Future()
        view = bridge.wrap(done_here)
        assert view is not own and not view.done()
        done_here.set_result(5)
        assert view.done() and view.result() == 5
        failed: concurrent.futures.Future[int] = concurrent.futures.Future()
        failed_view = bridge.wrap(failed)
        failed.set_exception(ValueError("x"))
        assert failed_view.done() and isinstance(failed_view.exception(), ValueError)
        own.set_result(1)
        assert await bridge.wrap(own) == 1

    asyncio.run(main())
