"""Group commit: writes submitted from many threads run together in one transaction, so one fsync covers them.

The threading only; what a group does (transaction, savepoints, commit) is the caller's `execute` function.
Used for SQLite, whose single writer pays a WAL fsync per commit; PostgreSQL groups commits on its own.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from typing import Any, Generic, TypeVar

__all__ = ["GroupCommit", "PendingWrite"]

C = TypeVar("C")
T = TypeVar("T")


class PendingWrite(Generic[C]):
    """One submitted write: `execute` calls `run(context)` for each, inside the group's transaction."""

    __slots__ = ("_lead", "_wake", "error", "fn", "result")

    def __init__(self, fn: Callable[[C], Any]) -> None:
        self.fn = fn
        self.result: Any = None
        self.error: BaseException | None = None
        self._wake = threading.Event()
        self._lead = False

    def run(self, context: C) -> None:
        """Call the write with `context`, keeping its result (the error is for `execute` to catch and set)."""
        self.result = self.fn(context)

    def fail(self, error: BaseException) -> None:
        """Mark the write failed (its own error, or the group's when the commit failed)."""
        self.error, self.result = error, None


class GroupCommit(Generic[C]):
    """Run writes from many threads in groups; each caller blocks until its group committed (or failed).

    Leader/follower, without a thread of its own: a caller that finds no group running leads one, taking up to
    `max_group` queued writes; the others wait. After its group the leader wakes the next queued caller to
    lead, then returns, so no caller runs other callers' writes for longer than one group.
    """

    def __init__(self, execute: Callable[[list[PendingWrite[C]]], None], max_group: int = 32) -> None:
        # `execute` runs a group and sets each write's result or error; it must not raise.
        self._execute = execute
        self._max_group = max_group
        self._mutex = threading.Lock()
        self._queue: deque[PendingWrite[C]] = deque()
        self._leading = False

    @property
    def queued(self) -> int:
        """Writes waiting for a group to take them (a gauge of write contention)."""
        with self._mutex:
            return len(self._queue)

    def submit(self, fn: Callable[[C], T]) -> T:
        """Run `fn(context)` in the next group and return its result once the group committed."""
        write = PendingWrite[C](fn)
        with self._mutex:
            self._queue.append(write)
            lead = not self._leading
            self._leading = True
        if not lead:
            write._wake.wait()
        if lead or write._lead:
            self._lead_group()
        if write.error is not None:
            raise write.error
        result: T = write.result
        return result

    def _lead_group(self) -> None:
        with self._mutex:
            group = [self._queue.popleft() for _ in range(min(self._max_group, len(self._queue)))]
        try:
            self._execute(group)
        except BaseException as exc:  # execute must not raise; if it does, no caller may wait forever
            for write in group:
                if write.error is None:
                    write.fail(exc)
        finally:
            with self._mutex:
                if self._queue:
                    self._queue[0]._lead = True
                    self._queue[0]._wake.set()
                else:
                    self._leading = False
            for write in group[1:]:  # group[0] is the leader itself
                write._wake.set()
