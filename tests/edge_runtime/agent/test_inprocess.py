"""The Agent inside a test-owned event loop in debug mode: nothing it does may block the loop."""

from __future__ import annotations

import asyncio
import threading
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from edge_runtime.agent import Agent
from edge_runtime.agent.systemd import SystemdNotifier
from edge_runtime.config import AgentConfig
from edge_runtime.kserve import KServeClient
from edge_runtime.models.store import ModelStore
from models.build import digits_holdout
from tests.edge_runtime.agent.conftest import NotifyListener
from tests.loopcheck import SLOW_CALLBACK_S, SlowCallbacks
from tests.waiting import wait_for


def _ready(client: KServeClient) -> bool:
    try:
        return client.ready()
    except grpc.RpcError:
        return False


def test_agent_never_blocks_its_loop(
    make_config: Callable[..., AgentConfig], model_packages: dict[str, Path], short_dir: Path
) -> None:
    # Metrics and a systemd watchdog on, so that starting, serving, pinging and draining all run here.
    # Caught two bugs: stopping the metrics HTTP server blocked the loop for up to 0.5 s, and stop() called
    # from another thread never woke the loop (asyncio.Event is not thread-safe).
    config = make_config(server={"metrics_address": "127.0.0.1:0"})
    store = ModelStore(config.data_dir / "models")
    store.install(model_packages["digits:1"])
    store.set_active("digits", 1)
    listener = NotifyListener(str(short_dir / "notify"))
    notifier = SystemdNotifier({"NOTIFY_SOCKET": listener.env_address, "WATCHDOG_USEC": "100000"})
    agent = Agent(config, notifier)
    pixels = digits_holdout()[0][:4]

    slow = SlowCallbacks().attach()
    loop = asyncio.new_event_loop()
    loop.set_debug(True)
    loop.slow_callback_duration = SLOW_CALLBACK_S

    def app() -> dict[str, Any]:
        """An app on its own thread: waits for the agent, infers, scrapes, then stops the agent."""
        wait_for(lambda: agent.endpoints.inference, 30, "the agent to listen")
        with KServeClient(agent.endpoints.inference[0], timeout_s=10) as client:
            wait_for(lambda: _ready(client), 30, "ServerReady")
            reply = client.infer("digits", {"pixels": pixels})
        url = f"http://127.0.0.1:{agent.endpoints.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as page:
            metrics = page.read().decode()
        wait_for(lambda: listener.count("WATCHDOG") >= 2, 10, "watchdog pings from the loop")
        agent.stop()  # from this thread, not the loop's
        return {"version": reply.model_version, "probabilities": reply.outputs["probabilities"], "metrics": metrics}

    async def main() -> dict[str, Any]:
        running = asyncio.ensure_future(agent.run(handle_signals=False))
        result: dict[str, Any] = {}

        def side_main() -> None:
            try:
                result.update(app())
            except BaseException as exc:
                result["error"] = exc
                agent.stop()

        side = threading.Thread(target=side_main, name="test-app")
        side.start()
        # Returns only because app() stopped the agent. Not wait_for: cancelling a task that missed its
        # wake-up hangs, and this test must fail rather than hang.
        done, _ = await asyncio.wait({running}, timeout=30)
        assert done, f"Agent.run did not return after stop() from another thread ({result.get('error')!r})"
        await running
        await loop.run_in_executor(None, side.join, 10)
        return result

    try:
        result = loop.run_until_complete(main())
        stopping = listener.count("STOPPING")
    finally:
        loop.run_until_complete(loop.shutdown_default_executor())
        loop.close()
        slow.detach()
        listener.close()

    if "error" in result:
        raise result["error"]
    assert slow.blocking() == []
    assert result["version"] == "1"
    probabilities = result["probabilities"]
    assert probabilities.shape == (4, 10)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)
    assert 'edgefleet_inference_request_success_total{model="digits",version="1"} 1.0' in result["metrics"]
    assert stopping == 1
    assert not Path(config.server.unix_socket).exists()
