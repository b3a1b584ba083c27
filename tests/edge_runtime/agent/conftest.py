"""Fixtures for the agent's tests: config files on disk, the CLI as a subprocess, running agent processes."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest

from tests.processes import AgentProcess, run_program, run_side_by_side, toml_text

CLI = [sys.executable, "-m", "edge_runtime.agent.cli"]
REPO_ROOT = Path(__file__).resolve().parents[3]


def run_cli(*args: str | Path, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return run_program(CLI, *args, timeout=timeout)


def run_cli_all(
    runs: Mapping[str, Sequence[str | Path]], timeout: float = 120
) -> dict[str, subprocess.CompletedProcess[str]]:
    return run_side_by_side(CLI, runs, timeout)


@pytest.fixture
def agent_processes() -> Iterator[Callable[..., AgentProcess]]:
    """start(config_path, env=None) -> AgentProcess; every one still running is killed at teardown."""
    started: list[AgentProcess] = []

    def start(config_path: Path, env: Mapping[str, str] | None = None) -> AgentProcess:
        agent = AgentProcess(config_path, env)
        started.append(agent)
        return agent

    yield start
    for agent in started:
        agent.kill()


@pytest.fixture
def agent_config(config_data: dict[str, Any], tmp_path: Path) -> dict[str, Any]:
    """The test's config data, listening on the Unix socket, loopback TCP and metrics (ports chosen by the OS)."""
    data = {section: dict(values) for section, values in config_data.items()}
    data["server"].update(tcp_address="127.0.0.1:0", metrics_address="127.0.0.1:0")
    data["agent"]["shutdown_grace_s"] = 10.0
    return data


@pytest.fixture
def write_config(tmp_path: Path) -> Callable[..., Path]:
    """write_config(data, name="edge-agent.toml") -> the path of a TOML file holding `data`."""

    def write(data: Mapping[str, Mapping[str, Any]], name: str = "edge-agent.toml") -> Path:
        path = tmp_path / name
        path.write_text(toml_text(data))
        return path

    return write


class NotifyListener:
    """What systemd does for Type=notify: a datagram socket that collects what the service sends."""

    def __init__(self, address: str) -> None:
        self.env_address = address
        bind_to = "\0" + address[1:] if address.startswith("@") else address
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(bind_to)
        self.sock.setblocking(False)
        self.messages: list[dict[str, str]] = []

    def receive(self) -> list[dict[str, str]]:
        """Every message so far, each as its KEY=VALUE fields."""
        while True:
            try:
                data = self.sock.recv(4096)
            except BlockingIOError:
                return self.messages
            self.messages.append(dict(line.split("=", 1) for line in data.decode().split("\n")))

    def count(self, key: str, value: str = "1", after: str | None = None) -> int:
        """How many messages set key=value (only those after the first that sets `after`=1)."""
        messages = self.receive()
        if after is not None:
            start = next((i for i, m in enumerate(messages) if m.get(after) == "1"), len(messages))
            messages = messages[start + 1 :]
        return sum(1 for m in messages if m.get(key) == value)

    def index(self, key: str, value: str = "1") -> int:
        return next(i for i, m in enumerate(self.receive()) if m.get(key) == value)

    def close(self) -> None:
        self.sock.close()


class RunningAgent:
    """An Agent inside this process on a loop thread in debug mode (tests/loopcheck.py judges it), serving its
    Unix socket; `stop()` drains it as SIGTERM does and returns what the loop check found."""

    def __init__(self, agent: Any, loop: Any) -> None:
        self.agent = agent
        self.loop = loop
        self.running = asyncio.run_coroutine_threadsafe(agent.run(handle_signals=False), loop.loop)

    def wait_ready(self, timeout: float = 60.0) -> None:
        from edge_runtime.kserve import KServeClient
        from tests.waiting import wait_for

        def up() -> bool:
            if self.running.done():
                self.running.result()  # raises what stopped it
            return bool(self.agent.endpoints.inference)

        wait_for(up, timeout, "the agent to listen")
        with KServeClient(self.agent.endpoints.inference[0], timeout_s=10) as client:
            wait_for(lambda: _ready(client), timeout, "ServerReady")

    def stop(self, timeout: float = 60.0) -> list[str]:
        self.agent.stop()
        try:
            self.running.result(timeout)
        finally:
            blocked: list[str] = self.loop.blocking()
            self.loop.close()
        return blocked


def _ready(client: Any) -> bool:
    import grpc

    try:
        return bool(client.ready())
    except grpc.RpcError:
        return False


@pytest.fixture
def run_agent() -> Iterator[Callable[..., RunningAgent]]:
    """run_agent(config) -> a RunningAgent, ready; stopped at teardown if the test did not stop it."""
    from edge_runtime.agent import Agent
    from tests.loopcheck import LoopThread

    started: list[RunningAgent] = []

    def run(config: Any) -> RunningAgent:
        running = RunningAgent(Agent(config), LoopThread("agent-loop"))
        started.append(running)
        running.wait_ready()
        return running

    yield run
    for running in started:
        if not running.running.done():
            running.stop()
