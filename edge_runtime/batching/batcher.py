"""The dynamic batcher: a bounded priority queue per model version, drained by engine worker threads.

Loop-agnostic by design (DESIGN.md "Concurrency on the device"): `submit` returns a
concurrent.futures.Future that the gRPC servicer awaits and the in-process API waits on. Work-conserving:
a free worker runs whatever is queued at once (Triton's default zero queue delay), so batches form from
the backlog under load and a lone request never waits for company unless max_queue_delay asks it to.
"""

from __future__ import annotations

import concurrent.futures
import heapq
import itertools
import threading
import time
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar

import structlog

from edge_runtime.batching.policy import BatchPlan
from edge_runtime.errors import EdgeRuntimeError, EngineError, Overloaded, RequestTimeout, ShuttingDown

__all__ = ["BatchObserver", "Batchable", "DynamicBatcher"]

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


@dataclass(order=True)
class _Item(Generic[R, T]):
    priority: int
    order: int
    request: R = field(compare=False)
    future: Future[T] = field(compare=False)
    enqueued: float = field(compare=False)


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
    ) -> None:
        self.name = name
        self._runner = runner
        self._observer = observer
        self._plan = plan
        self._instances = instances
        self._max_queue_depth = max_queue_depth
        self._cond = threading.Condition(threading.Lock())
        self._heap: list[_Item[R, T]] = []
        self._queued_rows = 0
        self._busy = 0
        self._closing = False
        self._order = itertools.count()
        self._workers: list[threading.Thread] = []
        # Thread id -> time.monotonic() at which the batch it executes started: what the agent's health loop
        # reads to find an engine that hangs. Plain dict operations (atomic under the GIL), no lock on the hot
        # path.
        self._running: dict[int, float] = {}
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

    def submit(self, request: R) -> Future[T]:
        """Queue a validated request; raises Overloaded or ShuttingDown at once instead of queueing."""
        future: Future[T] = Future()
        with self._cond:
            self._check_accepting()
            item = _Item(request.priority, next(self._order), request, future, time.monotonic())
            heapq.heappush(self._heap, item)
            self._queued_rows += request.rows
            self._cond.notify()
        return future

    def run(self, request: R) -> T:
        """Run on the caller's thread when an instance is free and nothing waits; else queue and wait.

        The fast path saves the thread hop (tens of microseconds) for in-process callers; it still counts
        as an instance, so no more than `instances` runs are ever in flight.
        """
        with self._cond:
            inline = (
                not self._heap
                and self._busy < self._instances
                and (self._plan.max_queue_delay_s == 0 or self._plan.max_batch_size == 1)
            )
            if inline:
                self._check_accepting()
                self._busy += 1
        if not inline:
            return self.wait(self.submit(request), request.deadline)
        try:
            return self._execute_inline(request)
        finally:
            with self._cond:
                self._busy -= 1
                if self._heap:  # a worker may be waiting for the slot this run held
                    self._cond.notify()

    def update(self, plan: BatchPlan, *, instances: int, max_queue_depth: int) -> None:
        """Apply a new plan or policy live: queued requests stay queued, running batches finish."""
        with self._cond:
            self._plan = plan
            self._instances = instances
            self._max_queue_depth = max_queue_depth
            self._workers = [t for t in self._workers if t.is_alive()]
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
        for item in leftover:
            self._observer.on_rejected("shutdown")
            _fail(item.future, ShuttingDown(f"{self.name} shut down before this request could run"))

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
                    # Counted here even when wait() already withdrew it at its deadline: once, as a timeout.
                    self._observer.on_rejected("timeout")
                    waited = time.monotonic() - item.enqueued
                    _fail(
                        item.future,
                        RequestTimeout(f"{self.name}: request waited {waited:.3f}s in the queue, past its timeout"),
                    )
                if batch:
                    self._execute(batch)
            finally:
                with self._cond:
                    self._busy -= 1
                    self._cond.notify()

    def _next_batch(self, index: int) -> tuple[list[_Item[R, T]] | None, list[_Item[R, T]]]:
        """Wait (holding the condition) for work this worker may take; None when it should exit."""
        while True:
            if index >= self._instances or (self._closing and not self._heap):
                return None, []
            if self._heap and self._busy < self._instances:
                break
            self._cond.wait()
        delay = self._plan.max_queue_delay_s
        if delay > 0 and not self._closing:
            until = self._heap[0].enqueued + delay
            while self._heap and self._queued_rows < self._plan.max_batch_size and not self._closing:
                left = until - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
        return self._take()

    def _take(self) -> tuple[list[_Item[R, T]], list[_Item[R, T]]]:
        """Pop the highest-priority request and every compatible one that fits; also the expired ones."""
        now = time.monotonic()
        batch: list[_Item[R, T]] = []
        expired: list[_Item[R, T]] = []
        skipped: list[_Item[R, T]] = []
        rows, limit = 0, self._plan.max_batch_size
        while self._heap and rows < limit and len(skipped) < 64:
            item = heapq.heappop(self._heap)
            request = item.request
            if request.deadline is not None and now > request.deadline:
                expired.append(item)
                self._queued_rows -= request.rows
            elif not batch or (request.group == batch[0].request.group and rows + request.rows <= limit):
                batch.append(item)
                rows += request.rows
                self._queued_rows -= request.rows
            else:
                skipped.append(item)
        for item in skipped:
            heapq.heappush(self._heap, item)
        return batch, expired

    def _execute(self, batch: list[_Item[R, T]]) -> None:
        live = [item for item in batch if item.future.set_running_or_notify_cancel()]
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
                item.future.set_exception(error)
            return
        finally:
            self._running.pop(ident, None)
        self._observer.on_batch(rows, len(live), queue_s, time.monotonic() - started, ok=True)
        for item, result in zip(live, results, strict=True):
            item.future.set_result(result)

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


def _fail(future: Future[Any], error: Exception) -> None:
    """Fail a future, unless its caller already withdrew it."""
    if future.set_running_or_notify_cancel():
        future.set_exception(error)
