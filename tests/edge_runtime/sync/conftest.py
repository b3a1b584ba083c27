"""Fixtures for the device's MQTT link: a real Mosquitto per test, an asyncio loop (debug mode) on a thread."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.mosquitto import Mosquitto

# asyncio's debug mode reports a callback that holds the loop longer than this; any report fails the test.
# asyncio's default is 0.1 s; a shared 2-core CI box shows unrelated 0.1-0.17 s hiccups (GC, CPU steal).
# 0.25 s still catches real blocking on the loop (a batch of CNN inference, a database call).
SLOW_CALLBACK_S = 0.25


class SlowCallbacks(logging.Handler):
    """Collects asyncio's debug-mode reports of a callback that held the loop past slow_callback_duration."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.reports: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage().startswith("Executing "):
            self.reports.append(record.getMessage())


class LoopThread:
    """An asyncio loop in debug mode on a named thread, as the agent runs its one loop."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.loop.set_debug(True)
        self.loop.slow_callback_duration = SLOW_CALLBACK_S
        self.slow = SlowCallbacks()
        logging.getLogger("asyncio").addHandler(self.slow)
        self.thread = threading.Thread(target=self.loop.run_forever, name="test-agent-loop", daemon=True)
        self.thread.start()

    def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run fn(*args) on the loop thread and return its result (as the agent's code would call it)."""

        async def run() -> Any:
            return fn(*args)

        return asyncio.run_coroutine_threadsafe(run(), self.loop).result(10)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()
        logging.getLogger("asyncio").removeHandler(self.slow)


@pytest.fixture
def loop() -> Iterator[LoopThread]:
    thread = LoopThread()
    yield thread
    thread.close()
    assert not thread.slow.reports, f"callbacks blocked the loop: {thread.slow.reports}"


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Mosquitto]:
    """A fresh broker with persistence (so sessions and retained messages survive its restart)."""
    with Mosquitto(tmp_path / "broker", persistence=True) as running:
        yield running
