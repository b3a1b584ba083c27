"""Group commit's threading, with a plain list standing in for the transaction: no database involved."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from cloud_sync.store.group_commit import GroupCommit, PendingWrite
from tests.waiting import wait_for


class Log:
    """A 'database': each group appends what its writes ran, and how big the group was."""

    def __init__(self, started: threading.Event | None = None, release: threading.Event | None = None) -> None:
        self.groups: list[int] = []
        self.entries: list[object] = []
        self._started, self._release = started, release

    def execute(self, group: list[PendingWrite[list[object]]]) -> None:
        if self._started is not None and self._release is not None and not self.groups:
            self._started.set()  # hold the first group so that the other writers queue up behind it
            assert self._release.wait(10)
        self.groups.append(len(group))
        for write in group:
            try:
                write.run(self.entries)
            except Exception as exc:
                write.fail(exc)


def test_each_caller_gets_its_own_result() -> None:
    log = Log()
    commit = GroupCommit[list[object]](log.execute)

    def append(value: int) -> int:
        return commit.submit(lambda entries: entries.append(value) or value * 10)

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(append, range(200)))

    assert results == [value * 10 for value in range(200)]
    assert sorted(log.entries) == list(range(200))  # type: ignore[type-var]
    assert sum(log.groups) == 200


def test_writers_that_arrive_during_a_group_share_the_next_one() -> None:
    started, release = threading.Event(), threading.Event()
    log = Log(started, release)
    commit = GroupCommit[list[object]](log.execute, max_group=32)
    with ThreadPoolExecutor(11) as pool:
        first = pool.submit(commit.submit, lambda entries: "first")
        assert started.wait(10)
        waiting = [pool.submit(commit.submit, lambda entries, i=i: i) for i in range(10)]
        wait_for(lambda: commit.queued == 10, what="ten writers queued behind the held group")
        release.set()
        assert first.result(10) == "first"
        assert [future.result(10) for future in waiting] == list(range(10))
    assert log.groups == [1, 10]


def test_max_group_bounds_a_group() -> None:
    started, release = threading.Event(), threading.Event()
    log = Log(started, release)
    commit = GroupCommit[list[object]](log.execute, max_group=4)
    with ThreadPoolExecutor(11) as pool:
        pool.submit(commit.submit, lambda entries: None)
        assert started.wait(10)
        waiting = [pool.submit(commit.submit, lambda entries, i=i: i) for i in range(10)]
        wait_for(lambda: commit.queued == 10, what="ten writers queued behind the held group")
        release.set()
        assert [future.result(10) for future in waiting] == list(range(10))
    assert log.groups == [1, 4, 4, 2]


def test_a_failing_write_fails_alone() -> None:
    log = Log()
    commit = GroupCommit[list[object]](log.execute)

    def write(value: int) -> int:
        def run(entries: list[object]) -> int:
            if value % 3 == 0:
                raise ValueError(f"refused {value}")
            return value

        return commit.submit(run)

    with ThreadPoolExecutor(6) as pool:
        futures = [pool.submit(write, value) for value in range(30)]
    for value, future in enumerate(futures):
        if value % 3 == 0:
            with pytest.raises(ValueError, match=f"refused {value}$"):
                future.result()
        else:
            assert future.result() == value


def test_an_execute_that_raises_fails_its_group_and_the_next_caller_still_runs() -> None:
    calls = []

    def execute(group: list[PendingWrite[None]]) -> None:
        calls.append(len(group))
        if len(calls) == 1:
            raise RuntimeError("disk on fire")
        for write in group:
            write.run(None)

    commit = GroupCommit[None](execute)
    with pytest.raises(RuntimeError, match="disk on fire"):
        commit.submit(lambda _: 1)
    assert commit.submit(lambda _: 2) == 2
