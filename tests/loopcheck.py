"""Did code under test block an asyncio loop? asyncio's debug-mode reports, judged so machine noise passes.

STYLE.md asks that tests run their loops in debug mode and fail on a callback that holds the loop. asyncio
measures a callback by wall time, so on the shared 2-core CI box a callback also "takes" as long as its
thread waits for a CPU or for the GIL while other threads (gRPC clients, batch workers) hold it: one-off
reports of 0.1-0.31 s were seen there inside grpc's own request handler, in tests that passed on a rerun.

What real blocking looks like is different: inference, a database call or an fsync on the loop happens on
every request or tick, so it is reported again and again; and one long stall (stopping a server
synchronously, a sleep) is long. So a test fails when a single report reaches BLOCKED_S, or when
SLOW_CALLBACK_S is passed REPEATED times; a lone short report is kept in the failure text of neither.
"""

from __future__ import annotations

import asyncio
import logging
import re
import threading
from collections.abc import Callable, Coroutine
from types import TracebackType
from typing import Any, TypeVar

SLOW_CALLBACK_S = 0.25
BLOCKED_S = 1.0
REPEATED = 2

T = TypeVar("T")

_REPORT = re.compile(r"^Executing (?P<what>.*) took (?P<seconds>[0-9.]+) seconds$", re.DOTALL)


class SlowCallbacks(logging.Handler):
    """Collects asyncio's reports of a callback that held the loop past loop.slow_callback_duration.

    Use as a context manager (attaches to the "asyncio" logger) or attach()/detach() it.
    """

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.reports: list[tuple[float, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        match = _REPORT.match(record.getMessage())
        if match:
            self.reports.append((float(match["seconds"]), match["what"][:300]))

    def attach(self) -> SlowCallbacks:
        logging.getLogger("asyncio").addHandler(self)
        return self

    def detach(self) -> None:
        logging.getLogger("asyncio").removeHandler(self)

    def __enter__(self) -> SlowCallbacks:
        return self.attach()

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self.detach()

    def blocking(self) -> list[str]:
        """The reports that show the loop was blocked by code (see the module's docstring); [] if none."""
        if len(self.reports) >= REPEATED:
            chosen = self.reports
        else:
            chosen = [(seconds, what) for seconds, what in self.reports if seconds >= BLOCKED_S]
        return [f"{seconds:.3f} s in {what}" for seconds, what in chosen]


class LoopThread:
    """An asyncio loop in debug mode on a named thread, as edge-agent runs its one loop; `slow` has its reports."""

    def __init__(self, name: str = "test-loop") -> None:
        self.loop = asyncio.new_event_loop()
        self.loop.set_debug(True)
        self.loop.slow_callback_duration = SLOW_CALLBACK_S
        self.slow = SlowCallbacks().attach()
        self.thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 30.0) -> T:
        """Run a coroutine on the loop and return its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def call(self, fn: Callable[..., T], *args: Any) -> T:
        """Run fn(*args) on the loop thread and return its result (as the agent's own code would call it)."""

        async def run() -> T:
            return fn(*args)

        return self.run(run(), 10)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()
        self.slow.detach()
