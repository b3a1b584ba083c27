"""The loop-blocking judge used by every test that runs an asyncio loop in debug mode."""

from __future__ import annotations

import asyncio
import logging
import time

from tests.loopcheck import BLOCKED_S, SLOW_CALLBACK_S, LoopThread, SlowCallbacks


def _report(slow: SlowCallbacks, seconds: float) -> None:
    """A record worded exactly as asyncio's base_events logs a slow callback."""
    message = "Executing %s took %.3f seconds"
    slow.handle(logging.LogRecord("asyncio", logging.WARNING, __file__, 1, message, ("<Task x>", seconds), None))


def test_a_callback_that_blocks_the_loop_on_every_call_is_caught() -> None:
    thread = LoopThread()
    try:
        for _ in range(2):
            thread.call(time.sleep, SLOW_CALLBACK_S + 0.05)
    finally:
        thread.close()
    blocked = thread.slow.blocking()
    assert len(blocked) == 2 and all(" s in " in report for report in blocked), blocked


def test_one_long_block_is_caught_and_one_short_hiccup_is_not() -> None:
    hiccup = SlowCallbacks()
    _report(hiccup, SLOW_CALLBACK_S + 0.06)
    assert hiccup.reports and hiccup.blocking() == []

    stall = SlowCallbacks()
    _report(stall, BLOCKED_S + 0.2)
    assert stall.blocking() == [f"{BLOCKED_S + 0.2:.3f} s in <Task x>"]


def test_other_asyncio_warnings_are_not_reports() -> None:
    slow = SlowCallbacks()
    with slow:
        logging.getLogger("asyncio").warning("socket.send() raised exception.")

        async def fast() -> int:
            return 1

        assert asyncio.run(fast(), debug=True) == 1
    assert slow.reports == []
