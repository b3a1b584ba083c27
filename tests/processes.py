"""Our programs as real subprocesses in tests: edge-agent and cloud-sync, with their JSON logs parsed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from edge_runtime.models.store import ModelStore
from tests.waiting import wait_for

REPO_ROOT = Path(__file__).resolve().parent.parent
AGENT = [sys.executable, "-m", "edge_runtime.agent.cli"]
CLOUD_SYNC = [sys.executable, "-m", "cloud_sync.cli"]


def run_program(program: Sequence[str], *args: str | Path, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """`program ARGS...` (AGENT or CLOUD_SYNC) as a real process, run to its end."""
    return subprocess.run([*program, *map(str, args)], capture_output=True, text=True, timeout=timeout, cwd=REPO_ROOT)


def run_side_by_side(
    program: Sequence[str], runs: Mapping[str, Sequence[str | Path]], timeout: float = 120
) -> dict[str, subprocess.CompletedProcess[str]]:
    """Independent invocations of `program` at once, by name (each pays the interpreter's start-up)."""
    procs = {
        name: subprocess.Popen(
            [*program, *map(str, argv)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO_ROOT
        )
        for name, argv in runs.items()
    }
    done = {}
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=timeout)
        done[name] = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    return done


def toml_text(data: Mapping[str, Mapping[str, Any]]) -> str:
    """The TOML of a {section: {key: scalar}} mapping (all our config needs; tomllib only reads)."""
    lines = []
    for section, values in data.items():
        lines.append(f"[{section}]")
        for key, value in values.items():
            # JSON's strings, numbers and booleans are valid TOML scalars.
            lines.append(f"{key} = {json.dumps(value)}")
        lines.append("")
    return "\n".join(lines)


class LoggedProcess:
    """A program of ours as a real subprocess; its JSON log lines are parsed as they arrive."""

    def __init__(self, argv: Sequence[str], env: Mapping[str, str] | None = None) -> None:
        environ = {**os.environ, **(env or {})}
        self.proc = subprocess.Popen(
            list(argv),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=environ,
            cwd=REPO_ROOT,
        )
        self.events: list[dict[str, Any]] = []
        self.not_json: list[str] = []
        self.stderr = ""
        self._lock = threading.Lock()
        self._readers = [
            threading.Thread(target=self._read_stdout, daemon=True),
            threading.Thread(target=self._read_stderr, daemon=True),
        ]
        for reader in self._readers:
            reader.start()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _read_stdout(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                event = json.loads(line)
            except ValueError:
                event = None
            with self._lock:
                if isinstance(event, dict):
                    self.events.append(event)
                else:
                    self.not_json.append(line)

    def _read_stderr(self) -> None:
        assert self.proc.stderr is not None
        text = self.proc.stderr.read()
        with self._lock:
            self.stderr = text

    def find(self, name: str) -> dict[str, Any] | None:
        with self._lock:
            return next((e for e in self.events if e.get("event") == name), None)

    def event_names(self) -> list[str]:
        with self._lock:
            return [str(e.get("event")) for e in self.events]

    def wait_event(self, name: str, timeout: float = 30.0) -> dict[str, Any]:
        def seen() -> dict[str, Any] | None:
            found = self.find(name)
            if found is None and self.proc.poll() is not None:
                self.finish(5)
                raise AssertionError(
                    f"{self.proc.args[2]} exited ({self.proc.returncode}) before logging {name}: {self.stderr}"
                )
            return found

        return wait_for(seen, timeout, f"log event {name}")

    def wait_ready(self, timeout: float = 30.0) -> dict[str, Any]:
        return self.wait_event("agent.ready", timeout)

    def signal(self, sig: int = signal.SIGTERM) -> None:
        self.proc.send_signal(sig)

    def finish(self, timeout: float) -> int:
        """Wait for the exit and for the log readers to drain the pipes; the exit code."""
        code = self.proc.wait(timeout)
        for reader in self._readers:
            reader.join(timeout)
        return code

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.finish(10)


class AgentProcess(LoggedProcess):
    """`edge-agent run --config FILE`."""

    def __init__(self, config_path: Path, env: Mapping[str, str] | None = None) -> None:
        super().__init__([*AGENT, "run", "--config", str(config_path)], env)


class CloudSyncProcess(LoggedProcess):
    """`cloud-sync run --config FILE`; `ready` holds its cloud_sync.ready event (grpc target, http url)."""

    def __init__(self, config_path: Path, env: Mapping[str, str] | None = None) -> None:
        super().__init__([*CLOUD_SYNC, "run", "--config", str(config_path)], env)

    def wait_ready(self, timeout: float = 30.0) -> dict[str, Any]:
        return self.wait_event("cloud_sync.ready", timeout)


def install(data: Mapping[str, Mapping[str, Any]], *packages: Path) -> ModelStore:
    """Install packages into the config's data dir, each becoming active in turn (as `edge-agent install`)."""
    store = ModelStore(Path(data["agent"]["data_dir"]) / "models")
    for package in packages:
        m = store.install(package).manifest
        store.set_active(m.name, m.version)
    return store
