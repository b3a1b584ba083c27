"""A new policy on a running agent under load: every section takes effect live and no request fails.

The agent runs in this process on a loop in debug mode (the loop check judges it), apps call it over its Unix
socket from threads, and telemetry goes through a real Mosquitto.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from edge_runtime.config import AgentConfig
from edge_runtime.kserve import KServeClient
from edge_runtime.policy import parse_policy
from tests.edge_runtime.agent.conftest import RunningAgent
from tests.mosquitto import Mosquitto, MqttWatcher
from tests.processes import install
from tests.waiting import wait_for

DEVICE = "cam-1"
TELEMETRY = f"edgefleet/v1/devices/{DEVICE}/telemetry"


class Apps:
    """Threads calling digits over the agent's socket as fast as they can; every outcome is counted."""

    def __init__(self, target: str, threads: int = 6) -> None:
        self.outcomes: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._x = np.random.default_rng(0).integers(0, 17, size=(1, 64)).astype(np.float32)
        self._threads = [threading.Thread(target=self._run, args=(target,), daemon=True) for _ in range(threads)]
        for t in self._threads:
            t.start()

    def _run(self, target: str) -> None:
        with KServeClient(target, timeout_s=30) as client:
            while not self._stop.is_set():
                try:
                    client.infer("digits", {"pixels": self._x})
                    outcome = "ok"
                except grpc.RpcError as exc:
                    outcome = exc.code().name
                with self._lock:
                    self.outcomes[outcome] += 1

    def answered(self) -> int:
        with self._lock:
            return self.outcomes["ok"]

    def wait_answers(self, more: int) -> None:
        start = self.answered()
        wait_for(lambda: self.answered() >= start + more, 30, f"{more} more answers")

    def stop(self) -> Counter[str]:
        self._stop.set()
        for t in self._threads:
            t.join(30)
        return self.outcomes


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Mosquitto]:
    with Mosquitto(tmp_path / "broker") as running:
        yield running


def test_a_policy_applies_live_under_load_without_failing_a_request(
    make_config: Callable[..., AgentConfig],
    config_data: dict[str, Any],
    model_packages: dict[str, Path],
    run_agent: Callable[..., RunningAgent],
    broker: Mosquitto,
) -> None:
    config = make_config(
        inference={"adaptive": False, "max_batch_size": 1, "max_queue_depth": 64, "instances": 1},
        upload={"sample_rate": 0.0},
        buffer={"max_bytes": 256 * 1024 * 1024},
        telemetry={"interval_s": 3600.0},
        cloud={"device_id": DEVICE},
        mqtt={"url": broker.url, "keepalive_s": 5},
    )
    install(config_data, model_packages["digits:1"])
    watcher = MqttWatcher(broker, [TELEMETRY])
    running = run_agent(config)
    agent = running.agent
    (served,) = agent.repository.models()
    apps = Apps(agent.endpoints.inference[0])
    try:
        apps.wait_answers(200)
        assert served.batcher.plan.max_batch_size == 1
        kept_before = agent.outbox.counters().produced_total  # events only (the model's activation): no samples
        assert kept_before < 10
        assert watcher.on(TELEMETRY) == []  # an hour's interval: nothing yet

        policy = parse_policy(
            """{"inference": {"max_batch_size": 8, "max_queue_delay_ms": 5, "instances": 2, "max_queue_depth": 512},
                "upload": {"sample_rate": 1.0},
                "buffer": {"max_bytes": 65536},
                "telemetry": {"interval_s": 0.2}}""",
            agent.base_policy,
        )
        change = running.loop.run(agent.apply_policy(policy))
        assert change.sections == ["inference", "upload", "buffer", "telemetry"]

        # inference: the next batches form under the new plan (a 5 ms wait fills them from 6 apps).
        assert served.batcher.plan.max_batch_size == 8
        assert served.policy.max_queue_depth == 512 and served.policy.instances == 2
        wait_for(lambda: any(rows > 1 for rows in served.stats.snapshot().batches), 30, "batches of several")
        # upload: every request is kept from now on; buffer: past 64 KiB the oldest are evicted.
        wait_for(lambda: agent.outbox.counters().evicted_total > 0, 30, "evictions past the new bound")
        counters = agent.outbox.counters()
        assert (
            counters.produced_total > kept_before + 100 and counters.bytes <= 65536 + 64 * 1024
        )  # one commit group of slack
        # telemetry: the collector publishes every 0.2 s at once, not after the hour it was sleeping out.
        wait_for(lambda: len(watcher.on(TELEMETRY)) >= 3, 10, "telemetry at the new interval")
        apps.wait_answers(200)
    finally:
        outcomes = apps.stop()
        watcher.close()
        blocked = running.stop()
    assert set(outcomes) == {"ok"}, outcomes  # not one request failed across the change
    assert agent.policy == policy
    assert not blocked, f"the agent blocked its loop: {blocked}"
