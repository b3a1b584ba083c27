"""The agent's health: the decision (plain facts in, a reason out), how long a real batcher's batch has run,
and the systemd watchdog fed by it: pings on a real NOTIFY_SOCKET while healthy, none while an engine is
stuck in one batch (an in-process engine double that blocks), and again once it recovers."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from edge_runtime.agent import Agent
from edge_runtime.agent.health import HealthFacts, gather, judge, running_since
from edge_runtime.agent.systemd import SystemdNotifier
from edge_runtime.batching.batcher import DynamicBatcher
from edge_runtime.batching.policy import BatchPlan
from edge_runtime.config import AgentConfig
from edge_runtime.models.store import ModelStore
from models.build import digits_holdout
from tests.edge_runtime.agent.conftest import NotifyListener, RunningAgent
from tests.loopcheck import LoopThread
from tests.waiting import wait_for

# -- the decision --------------------------------------------------------------------------------------------


def test_healthy_when_nothing_runs_long_and_the_writer_lives() -> None:
    assert judge(HealthFacts({"digits:1": 0.2}, True), stuck_batch_s=60) == ""
    assert judge(HealthFacts({}, None), stuck_batch_s=60) == ""  # no outbox: nothing to judge there


def test_a_batch_past_the_bound_names_the_model_and_the_time() -> None:
    reason = judge(HealthFacts({"digits:1": 0.1, "mobilenet:2": 75.0, "yolo:1": 61.0}, True), stuck_batch_s=60)
    assert reason == "engine of mobilenet:2 has been running one batch for 75 s (limit 60 s) (and 1 more)"
    assert judge(HealthFacts({"digits:1": 60.0}, True), stuck_batch_s=60) == ""  # at the bound, not past it


def test_a_dead_outbox_writer_is_unhealthy() -> None:
    assert "outbox writer thread has stopped" in judge(HealthFacts({}, False))


class _Blocking:
    """A runner that blocks until released: an engine stuck in one batch."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()

    def __call__(self, requests: list[Any]) -> list[int]:
        self.entered.set()
        self.release.wait(30)
        return [0 for _ in requests]


class _Request:
    rows, priority, deadline, group = 1, 1, None, ()


class _Observer:
    def on_batch(self, *args: Any, **kwargs: Any) -> None: ...

    def on_rejected(self, reason: str) -> None: ...


def test_running_since_reads_a_real_batchers_running_batch() -> None:
    runner = _Blocking()
    batcher: DynamicBatcher[Any, int] = DynamicBatcher(
        "stuck:1", runner, BatchPlan(1, 0.0, "test"), instances=1, max_queue_depth=4, observer=_Observer()
    )
    try:
        assert running_since(batcher) is None
        before = time.monotonic()
        future = batcher.submit(_Request())
        assert runner.entered.wait(10)
        since = running_since(batcher)
        assert since is not None and before <= since <= time.monotonic()

        class Served:
            pass

        served = Served()
        served.batcher = batcher  # type: ignore[attr-defined]
        facts = gather([served], None, since + 90)  # type: ignore[list-item]
        assert facts.running_batches == {"stuck:1": pytest.approx(90)}
        assert facts.outbox_writer_alive is None
        runner.release.set()
        assert future.result(10) == 0
        wait_for(lambda: running_since(batcher) is None, 10, "the batch to end")
    finally:
        runner.release.set()
        batcher.close(5)


# -- the watchdog on a real NOTIFY_SOCKET ---------------------------------------------------------------------


class _StuckEngine:
    """The served engine, blocking inside `run` while `stuck` is set (composition: wraps the real engine)."""

    def __init__(self, engine: Any) -> None:
        self._engine = engine
        self.stuck = threading.Event()
        self.entered = threading.Event()
        self.released = threading.Event()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)

    def run(self, inputs: Any, **kwargs: Any) -> Any:
        if self.stuck.is_set():
            self.entered.set()
            self.released.wait(60)
        return self._engine.run(inputs, **kwargs)


def _health(target: str) -> int:
    with grpc.insecure_channel(target) as channel:
        answer = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    return int(answer.status)


def test_watchdog_pings_while_healthy_and_stops_while_an_engine_is_stuck(
    make_config: Callable[..., AgentConfig], model_packages: dict[str, Path], short_dir: Path
) -> None:
    # digits would run on the event loop (its batches take microseconds), where a stuck engine stops the loop
    # itself, pings and all: this is about an engine thread that hangs while the loop goes on.
    config = make_config(inference={"run_on_loop": False})
    store = ModelStore(config.data_dir / "models")
    store.install(model_packages["digits:1"])
    store.set_active("digits", 1)
    listener = NotifyListener(str(short_dir / "notify"))
    notifier = SystemdNotifier({"NOTIFY_SOCKET": listener.env_address, "WATCHDOG_USEC": "200000"})
    running = RunningAgent(Agent(config, notifier, stuck_batch_s=0.5), LoopThread("agent-loop"))
    release: _StuckEngine | None = None
    try:
        running.wait_ready()
        target = running.agent.endpoints.inference[0]
        wait_for(lambda: listener.count("WATCHDOG") >= 3, 10, "pings while healthy")
        assert _health(target) == health_pb2.HealthCheckResponse.SERVING

        served = running.agent.repository.model("digits")
        release = engine = _StuckEngine(served.engine)
        served.engine = engine  # the served version runs its batches through the double from now on
        engine.stuck.set()
        future = running.agent.repository.submit(_infer_request())[1]
        assert engine.entered.wait(10)
        # Past the bound the agent turns unhealthy, says why once, and stops pinging.
        wait_for(lambda: running.agent.unhealthy, 10, "the agent to turn unhealthy")
        assert "engine of digits:1 has been running one batch" in running.agent.unhealthy
        wait_for(lambda: any("unhealthy" in m.get("STATUS", "") for m in listener.receive()), 5, "STATUS")
        stopped_at = len(listener.receive())
        assert _health(target) == health_pb2.HealthCheckResponse.NOT_SERVING
        # A second ago it would have pinged 5 times (every 0.1 s); it pings none.
        deadline = time.monotonic() + 1.0
        wait_for(lambda: time.monotonic() > deadline, 5, "a second of silence", poll=0.05)
        assert not [m for m in listener.receive()[stopped_at:] if m.get("WATCHDOG") == "1"]

        engine.released.set()  # the batch ends: healthy again, pings resume
        assert future.result(10).outputs["probabilities"].shape == (1, 10)
        wait_for(lambda: not running.agent.unhealthy, 10, "the agent to be healthy again")
        resumed = len(listener.receive())
        wait_for(lambda: sum(m.get("WATCHDOG") == "1" for m in listener.receive()[resumed:]) >= 2, 10, "pings")
        assert _health(target) == health_pb2.HealthCheckResponse.SERVING
    finally:
        if release is not None:
            release.released.set()
        assert running.stop() == []
        listener.close()


def _infer_request() -> Any:
    from edge_runtime.inference.types import InferRequest

    pixels = np.ascontiguousarray(digits_holdout()[0][:1])
    return InferRequest("digits", {"pixels": pixels})
