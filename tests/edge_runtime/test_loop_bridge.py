"""LoopBridge: thread results reach the loop intact, with one wake-up for a burst of them."""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading

import pytest

from edge_runtime.loop_bridge import LoopBridge


class CountingBridge(LoopBridge):
    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(loop)
        self.drains = 0

    def _drain(self) -> None:
        self.drains += 1
        super()._drain()


def test_results_and_errors_arrive_and_a_burst_costs_one_wakeup() -> None:
    async def main() -> None:
        bridge = CountingBridge(asyncio.get_running_loop())
        futures: list[concurrent.futures.Future[int]] = [concurrent.futures.Future() for _ in range(50)]
        waiters = [bridge.wrap(f) for f in futures]
        release = threading.Event()

        def complete_all() -> None:
            release.wait(10)
            for i, f in enumerate(futures):
                if i == 7:
                    f.set_exception(ValueError("seven"))
                else:
                    f.set_result(i)

        worker = threading.Thread(target=complete_all)
        worker.start()
        release.set()
        worker.join(10)  # the loop is blocked here on purpose: the whole burst lands before it drains
        results = await asyncio.gather(*waiters, return_exceptions=True)
        assert [r for i, r in enumerate(results) if i != 7] == [i for i in range(50) if i != 7]
        assert isinstance(results[7], ValueError)
        assert bridge.drains == 1

    asyncio.run(main())


def test_cancelling_the_waiter_withdraws_the_request() -> None:
    async def main() -> None:
        bridge = LoopBridge(asyncio.get_running_loop())
        queued: concurrent.futures.Future[int] = concurrent.futures.Future()
        waiter = bridge.wrap(queued)
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        # Done-callbacks run in FIFO order on the loop: once this one ran, the bridge's has too.
        turn = asyncio.get_running_loop().create_future()
        asyncio.get_running_loop().call_soon(turn.set_result, None)
        await turn
        assert queued.cancelled()

    asyncio.run(main())


def test_a_future_cancelled_by_the_worker_side_cancels_the_waiter() -> None:
    async def main() -> None:
        bridge = LoopBridge(asyncio.get_running_loop())
        source: concurrent.futures.Future[int] = concurrent.futures.Future()
        waiter = bridge.wrap(source)
        threading.Thread(target=source.cancel).start()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(waiter, 10)

    asyncio.run(main())
