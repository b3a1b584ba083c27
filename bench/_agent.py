"""A real edge-agent process for the benchmarks: its config file, installed packages, JSON log lines and RSS.

Started exactly as systemd starts it (`python -m edge_runtime.agent.cli run --config FILE`); not a fixture
for tests of the agent itself.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import psutil

from edgefleet.proto.inference import grpc_service_pb2 as pb
from edgefleet.proto.inference import grpc_service_pb2_grpc as pb_grpc

__all__ = ["AgentProcess", "install", "pinned", "scratch_dir", "write_config"]

CLI = [sys.executable, "-m", "edge_runtime.agent.cli"]
# Reconnect quickly while the agent is not listening yet: gRPC's default first backoff is 1 s, which
# would be measured as start-up time.
FAST_RECONNECT = [
    ("grpc.initial_reconnect_backoff_ms", 10),
    ("grpc.min_reconnect_backoff_ms", 10),
    ("grpc.max_reconnect_backoff_ms", 50),
]


def pinned(cpus: frozenset[int] | None) -> list[str]:
    """The command prefix that runs a program on `cpus` only (util-linux taskset; every thread it starts
    inherits it). Not preexec_fn: a fork from a process with threads (the benchmarks' log readers) may deadlock
    before exec. Empty for None, or where taskset is missing (then unpinned)."""
    if cpus is None or shutil.which("taskset") is None:
        return []
    return ["taskset", "-c", ",".join(str(c) for c in sorted(cpus))]


@contextmanager
def scratch_dir() -> Iterator[Path]:
    """A short directory under /tmp (Unix socket paths are limited to 107 bytes), removed afterwards."""
    path = Path(tempfile.mkdtemp(prefix="efb-", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def write_config(
    directory: Path, *, threads: int, inference: Mapping[str, Any] | None = None, http: bool = False
) -> Path:
    """An agent config under `directory`: its own data dir and Unix sockets (gRPC; HTTP/REST too with `http`),
    no TCP, metrics on a free port."""
    sections: dict[str, Mapping[str, Any]] = {
        "agent": {"data_dir": str(directory / "data"), "shutdown_grace_s": 5.0},
        "server": {
            "unix_socket": str(directory / "infer.sock"),
            "tcp_address": "",
            "http_unix_socket": str(directory / "http.sock") if http else "",
            "http_tcp_address": "",
            "metrics_address": "127.0.0.1:0",
        },
        "engine": {"backend": "onnxruntime", "intra_op_threads": threads},
        "inference": dict(inference or {}),
    }
    lines = []
    for section, values in sections.items():
        lines.append(f"[{section}]")
        # JSON scalars (strings, numbers, true/false) are valid TOML scalars.
        lines += [f"{key} = {json.dumps(value)}" for key, value in values.items()]
    path = directory / "agent.toml"
    directory.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


def install(config: Path, package: Path) -> None:
    """Install and activate a package with the agent's own CLI (what an operator runs)."""
    subprocess.run([*CLI, "install", str(package), "--config", str(config)], check=True, capture_output=True)


@dataclass
class AgentProcess:
    """A running agent; `spawned` is time.monotonic() just before the process was created."""

    config: Path
    socket: Path
    process: subprocess.Popen[str]
    spawned: float
    events: list[dict[str, Any]] = field(default_factory=list)
    _changed: threading.Condition = field(default_factory=threading.Condition)

    @classmethod
    def spawn(
        cls, config: Path, env: Mapping[str, str] | None = None, cpus: frozenset[int] | None = None
    ) -> AgentProcess:
        """Start the agent; `env` adds environment variables (e.g. glibc malloc tunables); `cpus` pins the
        process (every thread it ever starts) to those CPUs."""
        socket = config.parent / "infer.sock"
        environ = {**os.environ, **(env or {})}
        spawned = time.monotonic()
        process = subprocess.Popen(
            [*pinned(cpus), *CLI, "run", "--config", str(config)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=environ,
        )
        agent = cls(config, socket, process, spawned)
        threading.Thread(target=agent._read_logs, name="agent-log-reader", daemon=True).start()
        return agent

    @property
    def target(self) -> str:
        return f"unix:{self.socket}"

    @property
    def pid(self) -> int:
        return self.process.pid

    def _read_logs(self) -> None:
        # Drained continuously: a full pipe would block the agent's logging.
        assert self.process.stdout is not None
        for line in self.process.stdout:
            try:
                event = json.loads(line)
            except ValueError:
                event = {"event": "stdout", "text": line.rstrip()}
            with self._changed:
                self.events.append(event if isinstance(event, dict) else {"event": "stdout", "text": line})
                self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    def wait_event(self, name: str, timeout: float = 60.0) -> dict[str, Any]:
        """The first log event called `name`; RuntimeError with the log tail if the agent exits or stalls."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                for event in self.events:
                    if event.get("event") == name:
                        return event
                left = deadline - time.monotonic()
                if self.process.poll() is not None or left <= 0:
                    tail = "\n".join(json.dumps(e) for e in self.events[-10:])
                    raise RuntimeError(f"agent gave no {name!r} (exit code {self.process.poll()}); log tail:\n{tail}")
                self._changed.wait(min(left, 0.1))

    def wait_model_ready(self, model: str, timeout: float = 60.0) -> float:
        """Poll ModelReady until true; the seconds from spawn to the first true answer."""
        deadline = time.monotonic() + timeout
        while not self.socket.exists():
            self._check_alive(deadline, model)
            time.sleep(0.002)
        with grpc.insecure_channel(self.target, options=FAST_RECONNECT) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            while True:
                try:
                    reply = stub.ModelReady(pb.ModelReadyRequest(name=model), timeout=1.0, wait_for_ready=True)
                    if reply.ready:
                        return time.monotonic() - self.spawned
                except grpc.RpcError:
                    pass  # not listening yet
                self._check_alive(deadline, model)
                time.sleep(0.005)

    def _check_alive(self, deadline: float, model: str) -> None:
        if self.process.poll() is not None or time.monotonic() > deadline:
            tail = "\n".join(json.dumps(e) for e in self.events[-10:])
            raise RuntimeError(f"{model} never became ready (exit code {self.process.poll()}); log tail:\n{tail}")

    def memory(self) -> dict[str, int]:
        """VmRSS (what psutil reports as rss) and VmHWM (the peak), in bytes."""
        status = psutil.Process(self.pid)
        peak = 0
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                peak = int(line.split()[1]) * 1024
        return {"rss": status.memory_info().rss, "peak_rss": peak}

    def stop(self, timeout: float = 20.0) -> int:
        """SIGTERM (the agent drains and exits) and wait; SIGKILL past `timeout`."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode
