"""The dynamic batcher: a bounded priority queue per model version, drained by engine worker threads.

Loop-agnostic by design (DESIGN.md "Concurrency on the device"): `submit` returns a
concurrent.futures.Future that the gRPC servicer awaits and the in-process API waits on. Work-conserving:
a free worker runs whatever is queued at once (Triton's default zero queue delay), so batches form from
the backlog under load and a lone request never waits for company unless max_queue_delay asks it to.

On the loop: a model whose planned batch runs in less time than the hop to a thread and back costs
(policy.ON_LOOP_LIMIT_S) is drained by the server's event loop itself, once per loop iteration: the requests
that arrived in that iteration form one batch, and their futures complete on the loop with no wake-up.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import heapq
import itertools
import threading
import time
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

import structlog

from edge_runtime.batching.policy import ON_LOOP_LIMIT_S, BatchPlan
from edge_runtime.errors import EdgeRuntimeError, EngineError, Overloaded, RequestTimeout, ShuttingDown

__all__ = ["BatchObserver", "Batchable", "DynamicBatcher", "Outcome"]

log = structlog.get_logger(__name__)


class Batchable(Protocol):
    """What the batcher needs to know of a request."""

    @property
    def rows(self) -> int: ...

    @property
    def priority(self) -> int: ...

    @property
    def deadline(self) -> float | None:
        """time.monotonic() after which the request must not start; None: no limit."""
        ...

    @property
    def group(self) -> Hashable:
        """Requests batch together only with requests of the same group (same non-batch dimensions)."""
        ...


class BatchObserver(Protocol):
    def on_batch(self, rows: int, requests: int, queue_s: Sequence[float], compute_s: float, ok: bool) -> None: ...

    def on_rejected(self, reason: str) -> None: ...


R = TypeVar("R", bound=Batchable)
T = TypeVar("T")


# What a request's caller holds: a concurrent future (any thread), or an asyncio future of the attached loop
# (submit(awaitable=True) on that loop: completed there with no hop).
Outcome = Future[T] | asyncio.Future[T]


@dataclass(slots=True)
class _Item(Generic[R, T]):
    request: R
    future: Outcome[T]
    enqueued: float


# SLOW_BATCHES_TO_LEAVE batches in a row on the loop that take this long (wall time) send the model to the engine
# threads (_leave_loop). Several: a loop thread descheduled once on a busy box is not a slow engine.
ON_LOOP_GIVE_UP_S = 10 * ON_LOOP_LIMIT_S
SLOW_BATCHES_TO_LEAVE = 3

# Heap entries: (priority, arrival order, item); the two ints decide, so heapq compares in C.
_Entry = tuple[int, int, _Item[R, T]]


class DynamicBatcher(Generic[R, T]):
    """Batches requests of one model version and runs them with `runner` on `instances` worker threads.

    `runner(requests)` returns one result per request, in order, or raises; a raise fails that batch only.
    """

    def __init__(
        self,
        name: str,
        runner: Callable[[list[R]], Sequence[T]],
        plan: BatchPlan,
        *,
        instances: int,
        max_queue_depth: int,
        observer: BatchObserver,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        self.name = name
        self._runner = runner
        self._observer = observer
        self._plan = plan
        self._instances = instances
        self._max_queue_depth = max_queue_depth
        self._cond = threading.Condition(threading.Lock())
        self._heap: list[_Entry[R, T]] = []
        self._queued_rows = 0
        self._busy = 0
        self._closing = False
        self._order = itertools.count()
        self._workers: list[threading.Thread] = []
        # Thread id -> time.monotonic() at which the batch it executes started: what the agent's health loop
        # reads to find an engine that hangs. Plain dict operations (atomic under the GIL), no lock on the hot
        # path.
        self._running: dict[int, float] = {}
        # The event loop that drains the queue when the plan says so (None: engine threads only), its thread,
        # and whether a drain is scheduled on it.
        self._loop = loop
        self._loop_thread = -1
        self._drain_scheduled = False
        self._slow_batches = 0  # on-loop batches in a row that took longer than ON_LOOP_GIVE_UP_S
        self._start_workers()

    # -- public API -------------------------------------------------------------------------------------

    @property
    def plan(self) -> BatchPlan:
        return self._plan

    def pending(self) -> int:
        """Requests queued and not yet started."""
        return len(self._heap)

    def running_since(self) -> float | None:
        """time.monotonic() at which the oldest batch still executing started; None when none is."""
        return min(list(self._running.values()), default=None)

    def attach_loop(self, loop: asyncio.AbstractEventLoop | None) -> None:
        """The event loop that runs batches when the plan is on_loop (None: engine threads run them all)."""
        with self._cond:
            on_its_thread = loop is not None and _running_loop() is loop
            self._loop, self._loop_thread = loop, threading.get_ident() if on_its_thread else -1
            # A drain scheduled on a loop that stopped before running it never comes: schedule afresh (a stale
            # one left on the old loop re-checks on_loop and does nothing).
            self._drain_scheduled = False
            self._hand_to_loop()
            self._cond.notify_all()

    @property
    def on_loop(self) -> bool:
        """Batches run on the attached event loop now."""
        loop = self._loop
        return self._plan.on_loop and loop is not None and not loop.is_closed()

    def submit(self, request: R) -> Future[T]:
        """Queue a validated request; raises Overloaded or ShuttingDown at once instead of queueing."""
        future: Future[T] = Future()
        self._queue(request, future)
        return future

    def submit_awaitable(self, request: R) -> Outcome[T]:
        """`submit` for a caller that awaits the result on the attached loop: when this model runs there and
        the caller is on it, an asyncio future completed on the loop (no hop, no lock); else a concurrent one.

        On the loop with nothing queued and an instance free, the request runs at once, inside this call, and
        the future comes back done: no queue, no drain scheduled, no task switch (measured: ~30 µs of Python per
        request at one in flight, more than the model). A queue then never forms from the loop's own callers,
        which at 16 in flight over gRPC formed none anyway (grpc.aio hands over one call per poller round trip).
        """
        loop = self._loop
        if loop is not None and threading.get_ident() == self._loop_thread and self.on_loop:
            future: asyncio.Future[T] = loop.create_future()
            if not self._claim_inline():
                self._queue(request, future)
                return future
            started = time.monotonic()
            try:
                future.set_result(self._execute_inline(request))
            except EdgeRuntimeError as exc:
                future.set_exception(exc)
            finally:
                self._after_on_loop(time.monotonic() - started)
            return future
        return self.submit(request)

    def _claim_inline(self) -> bool:
        """Take an instance for a run on the caller's thread, if one is free and nothing waits to be batched
        (no queue delay asked for); raises Overloaded or ShuttingDown as submit does."""
        with self._cond:
            inline = (
                not self._heap
                and self._busy < self._instances
                and (self._plan.max_queue_delay_s == 0 or self._plan.max_batch_size == 1)
            )
            if inline:
                self._check_accepting()
                self._busy += 1
            return inline

    def _queue(self, request: R, future: Outcome[T]) -> None:
        with self._cond:
            self._check_accepting()
            heapq.heappush(self._heap, (request.priority, next(self._order), _Item(request, future, time.monotonic())))
            self._queued_rows += request.rows
            if not self._hand_to_loop():
                self._cond.notify()

    def run(self, request: R) -> T:
        """Run on the caller's thread when an instance is free and nothing waits; else queue and wait.

        The fast path saves the thread hop (tens of microseconds) for in-process callers; it still counts
        as an instance, so no more than `instances` runs are ever in flight.
        """
        if not self._claim_inline():
            return self.wait(self.submit(request), request.deadline)
        try:
            return self._execute_inline(request)
        finally:
            with self._cond:
                self._busy -= 1
                # A worker (or the loop) may be waiting for the slot this run held.
                if self._heap and not self._hand_to_loop():
                    self._cond.notify()

    def update(self, plan: BatchPlan, *, instances: int, max_queue_depth: int) -> None:
        """Apply a new plan or policy live: queued requests stay queued, running batches finish."""
        with self._cond:
            self._plan = plan
            self._instances = instances
            self._max_queue_depth = max_queue_depth
            self._workers = [t for t in self._workers if t.is_alive()]
            self._hand_to_loop()
            self._cond.notify_all()
        self._start_workers()

    def close(self, timeout: float = 10.0) -> None:
        """Stop taking requests, let queued and running ones finish for up to `timeout`, fail the rest."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        deadline = time.monotonic() + timeout
        for worker in self._workers:
            worker.join(max(0.0, deadline - time.monotonic()))
        with self._cond:
            leftover, self._heap, self._queued_rows = self._heap, [], 0
        for _, _, item in leftover:
            self._observer.on_rejected("shutdown")
            self._fail(item.future, ShuttingDown(f"{self.name} shut down before this request could run"))

    # -- internals --------------------------------------------------------------------------------------

    def _check_accepting(self) -> None:
        if self._closing:
            raise ShuttingDown(f"{self.name} is shutting down and takes no new requests")
        if len(self._heap) >= self._max_queue_depth:
            self._observer.on_rejected("queue_full")
            raise Overloaded(
                f"{self.name}: queue is full ({self._max_queue_depth} requests waiting); retry with backoff, "
                "or raise inference.max_queue_depth / inference.instances"
            )

    def wait(self, future: Future[T], deadline: float | None) -> T:
        """The result of a submitted request; one still queued at its deadline is withdrawn and times out."""
        if deadline is None:
            return future.result()
        try:
            return future.result(timeout=max(0.0, deadline - time.monotonic()))
        except concurrent.futures.TimeoutError:
            if not future.cancel():
                return future.result()  # it started in time: let it finish
            # Counted once, by the worker that drops the withdrawn request from the queue.
            raise RequestTimeout(f"{self.name}: request was still queued at its timeout") from None

    def _start_workers(self) -> None:
        with self._cond:
            missing = self._instances - len(self._workers)
            for _ in range(max(0, missing)):
                index = len(self._workers)
                worker = threading.Thread(
                    target=self._work, args=(index,), name=f"engine-{self.name}-{index}", daemon=True
                )
                self._workers.append(worker)
                worker.start()

    def _work(self, index: int) -> None:
        while True:
            with self._cond:
                batch, expired = self._next_batch(index)
                if batch is None:
                    return
                self._busy += 1
            try:
                for item in expired:
                    self._expire(item)
                if batch:
                    self._execute(batch)
            finally:
                with self._cond:
                    self._busy -= 1
                    # The plan may have moved onto the loop meanwhile: the loop drains what this batch held up.
                    self._hand_to_loop()
                    self._cond.notify()

    def _next_batch(self, index: int) -> tuple[list[_Item[R, T]] | None, list[_Item[R, T]]]:
        """Wait (holding the condition) for work this worker may take; None when it should exit."""
        while True:
            if index >= self._instances or (self._closing and not self._heap):
                return None, []
            # On the loop, the loop drains the queue; while closing, the workers finish what is left.
            if self._heap and self._busy < self._instances and (self._closing or not self.on_loop):
                break
            self._cond.wait()
        delay = self._plan.max_queue_delay_s
        if delay > 0 and not self._closing:
            until = self._heap[0][2].enqueued + delay
            while self._heap and self._queued_rows < self._plan.max_batch_size and not self._closing:
                left = until - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
        return self._take()

    # -- on the loop ------------------------------------------------------------------------------------

    def _hand_to_loop(self) -> bool:
        """Whether the loop drains what is queued (called holding the lock): true when it runs this model, requests
        wait and the batcher is not closing; a drain is then scheduled unless one already is."""
        if not (self._heap and self.on_loop and not self._closing):
            return False
        if not self._drain_scheduled:
            self._schedule_drain()
        return True

    def _schedule_drain(self) -> None:
        """Drain the queue on the loop once the requests of this iteration are in (called holding the lock)."""
        loop = self._loop
        assert loop is not None
        self._drain_scheduled = True
        delay = self._plan.max_queue_delay_s
        try:
            if threading.get_ident() != self._loop_thread:
                loop.call_soon_threadsafe(self._drain_on_loop, delay)
            elif delay > 0:
                loop.call_later(delay, self._drain_on_loop, 0.0)
            else:
                loop.call_soon(self._drain_on_loop, 0.0)
        except RuntimeError:  # the loop closed meanwhile: the engine threads take over
            self._drain_scheduled = False
            self._loop = None
            self._cond.notify_all()

    def _drain_on_loop(self, delay: float) -> None:
        """Run one batch on the loop (no longer than policy.ON_LOOP_LIMIT_S); another drain follows while
        requests are queued, after the loop's other ready work.

        It runs at the first chance: grpc.aio takes in one new call per poller round trip, so waiting more
        iterations for company (tried: spinning the loop with call_soon) only starved grpc's poller thread of
        the GIL on one core and formed no larger batches (docs/performance.md).
        """
        self._loop_thread = threading.get_ident()
        if delay > 0:  # submitted from another thread: wait for company on the loop's clock
            self._loop.call_later(delay, self._drain_on_loop, 0.0)  # type: ignore[union-attr]
            return
        with self._cond:
            self._drain_scheduled = False
            if not self.on_loop or self._closing or self._busy >= self._instances:
                self._cond.notify_all()  # the workers take it from here (or a running inline call finishes)
                return
            batch, expired = self._take()
            self._busy += 1
        started = time.monotonic()
        try:
            for item in expired:
                self._expire(item)
            if batch:
                self._execute(batch)
        finally:
            self._after_on_loop(time.monotonic() - started)

    def _after_on_loop(self, took: float) -> None:
        """A batch that ran on the loop (`took` seconds) ended: free its instance, leave the loop after too many
        slow ones, and drain what queued meanwhile."""
        with self._cond:
            self._busy -= 1
            self._slow_batches = self._slow_batches + 1 if took > ON_LOOP_GIVE_UP_S else 0
            if self._slow_batches >= SLOW_BATCHES_TO_LEAVE and self._plan.on_loop:
                self._leave_loop(took)
            # No waking idle workers for nothing (a wake-up costs a hop): only for a queue the loop does not take.
            if (self._heap or self._closing) and not self._hand_to_loop():
                self._cond.notify()

    def _leave_loop(self, took: float) -> None:
        """A batch held the loop far longer than its profile said: engine threads run this model from now on
        (until the next plan), so a slow or stuck engine never holds the agent's other conversations again."""
        reason = f"{self._plan.reason}; moved to engine threads: a batch held the event loop {took * 1e3:.1f} ms"
        self._plan = dataclasses.replace(self._plan, on_loop=False, reason=reason)
        log.warning("batch.left_loop", model=self.name, seconds=round(took, 4))
        self._cond.notify_all()

    # -- both -------------------------------------------------------------------------------------------

    def _expire(self, item: _Item[R, T]) -> None:
        # Counted here even when wait() already withdrew it at its deadline: once, as a timeout.
        self._observer.on_rejected("timeout")
        waited = time.monotonic() - item.enqueued
        self._fail(
            item.future, RequestTimeout(f"{self.name}: request waited {waited:.3f}s in the queue, past its timeout")
        )

    def _fail(self, future: Outcome[T], error: Exception) -> None:
        """Fail a future, unless its caller already withdrew it."""
        if _start(future):
            self._settle(future, None, error)

    def _settle(self, future: Outcome[T], result: T | None, error: Exception | None) -> None:
        """Complete a started future; an asyncio one on its own loop (at once when this is its thread)."""
        if isinstance(future, Future):
            if error is None:
                future.set_result(result)  # type: ignore[arg-type]
            else:
                future.set_exception(error)
            return
        if threading.get_ident() == self._loop_thread:
            _settle_async(future, result, error)
            return
        # A worker finishing what the loop left (closing, or the loop detached); a closed loop raises
        # RuntimeError, and then nobody awaits this any more.
        with contextlib.suppress(RuntimeError):
            future.get_loop().call_soon_threadsafe(_settle_async, future, result, error)

    def _take(self) -> tuple[list[_Item[R, T]], list[_Item[R, T]]]:
        """Pop the highest-priority request and every compatible one that fits; also the expired ones."""
        now = time.monotonic()
        batch: list[_Item[R, T]] = []
        expired: list[_Item[R, T]] = []
        skipped: list[_Entry[R, T]] = []
        rows, limit = 0, self._plan.max_batch_size
        while self._heap and rows < limit and len(skipped) < 64:
            entry = heapq.heappop(self._heap)
            item = entry[2]
            request = item.request
            if request.deadline is not None and now > request.deadline:
                expired.append(item)
                self._queued_rows -= request.rows
            elif not batch or (request.group == batch[0].request.group and rows + request.rows <= limit):
                batch.append(item)
                rows += request.rows
                self._queued_rows -= request.rows
            else:
                skipped.append(entry)
        for entry in skipped:
            heapq.heappush(self._heap, entry)
        return batch, expired

    def _execute(self, batch: list[_Item[R, T]]) -> None:
        live = [item for item in batch if _start(item.future)]
        for _ in range(len(batch) - len(live)):
            # Withdrawn by its caller (wait() past the deadline, a gRPC client gone): counted, never run.
            self._observer.on_rejected("cancelled")
        if not live:
            return
        started = time.monotonic()
        queue_s = [started - item.enqueued for item in live]
        rows = sum(item.request.rows for item in live)
        ident = threading.get_ident()
        self._running[ident] = started
        try:
            results = self._runner([item.request for item in live])
        except Exception as exc:
            self._observer.on_batch(rows, len(live), queue_s, time.monotonic() - started, ok=False)
            error = _as_runtime_error(exc, self.name)
            for item in live:
                self._settle(item.future, None, error)
            return
        finally:
            self._running.pop(ident, None)
        self._observer.on_batch(rows, len(live), queue_s, time.monotonic() - started, ok=True)
        for item, result in zip(live, results, strict=True):
            self._settle(item.future, result, None)

    def _execute_inline(self, request: R) -> T:
        started = time.monotonic()
        ident = threading.get_ident()
        self._running[ident] = started
        try:
            result = self._runner([request])[0]
        except Exception as exc:
            self._observer.on_batch(request.rows, 1, (0.0,), time.monotonic() - started, ok=False)
            raise _as_runtime_error(exc, self.name) from exc
        finally:
            self._running.pop(ident, None)
        self._observer.on_batch(request.rows, 1, (0.0,), time.monotonic() - started, ok=True)
        return result


def _as_runtime_error(exc: Exception, name: str) -> EdgeRuntimeError:
    if isinstance(exc, EdgeRuntimeError):
        return exc
    log.error("batch.failed", model=name, error=repr(exc))
    return EngineError(f"{name}: inference failed ({type(exc).__name__}); see the agent log")


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


def _start(future: Future[Any] | asyncio.Future[Any]) -> bool:
    """Mark a future running; False when its caller withdrew it (cancelled) before it started."""
    if isinstance(future, Future):
        return future.set_running_or_notify_cancel()
    return not future.done()


def _settle_async(future: asyncio.Future[T], result: T | None, error: Exception | None) -> None:
    if future.done():  # cancelled meanwhile (the caller went away)
        return
    if error is None:
        future.set_result(result)  # type: ignore[arg-type]
    else:
        future.set_exception(error)
