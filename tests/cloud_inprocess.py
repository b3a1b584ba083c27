"""cloud-sync inside the test process: the real `CloudSync.run` on a loop thread in debug mode, on real ports.

    cloud = InProcessCloud(tmp_path / "cloud").start()
    token = cloud.add_device("cam-1")
    cloud.control.set_desired("cam-1", DesiredState(policy_json=...))    # the open streams get it at once
    cloud.stop()                                                            # SIGTERM's path; then .blocked

For tests that need the cloud's own objects (its ControlStore, so a new desired state is notified in-process)
or its loop judged by tests/loopcheck.py; a test about the process itself uses tests/processes.py instead.
Needs the [cloud] extra (tests that use it skip without sqlalchemy).
"""

from __future__ import annotations

import asyncio
import socket
from concurrent.futures import Future
from pathlib import Path
from typing import Any

from cloud_sync.config import config_from_dict
from cloud_sync.process import CloudSync
from cloud_sync.store import Database, DeviceRegistry, ResultStore, open_database
from cloud_sync.store.control import ControlStore, StoredReport
from cloud_sync.store.telemetry import DevicePresence, LatestTelemetry, TelemetryStore
from tests.loopcheck import LoopThread
from tests.waiting import wait_for

__all__ = ["InProcessCloud"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class InProcessCloud:
    """One cloud-sync on a fixed gRPC port (a restart is the same endpoint to devices), SQLite in `workdir`."""

    def __init__(self, workdir: Path, *, mqtt: dict[str, Any] | None = None, grpc_port: int | None = None) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.grpc_port = grpc_port or _free_port()
        data: dict[str, Any] = {
            "server": {"data_dir": str(workdir / "data"), "shutdown_grace_s": 2.0},
            "grpc": {"listen": f"127.0.0.1:{self.grpc_port}"},
            "http": {"listen": "127.0.0.1:0"},
        }
        if mqtt:
            data["mqtt"] = mqtt
        self.config = config_from_dict(data)
        self.target = f"127.0.0.1:{self.grpc_port}"
        self.blocked: list[str] = []  # what the loop checks of every run so far found
        self.reports: list[tuple[float, str]] = []  # every slow-callback report of every run
        self.app: CloudSync | None = None
        self._loop: LoopThread | None = None
        self._running: Future[None] | None = None
        self._db: Database | None = None

    def start(self, timeout: float = 30.0) -> InProcessCloud:
        self._loop = LoopThread("cloud-sync-loop")
        self.app = app = CloudSync(self.config)
        self._running = asyncio.run_coroutine_threadsafe(app.run(handle_signals=False), self._loop.loop)

        def ready() -> bool:
            if self._running is not None and self._running.done():
                self._running.result()  # raises what stopped it
            return bool(app.control_store is not None and app.endpoints.http_port and app.endpoints.grpc_port)

        wait_for(ready, timeout, "cloud-sync to listen")
        return self

    def stop(self, timeout: float = 30.0) -> None:
        """Stop as on SIGTERM; the loop check of this run is added to `blocked`."""
        if self.app is None or self._loop is None or self._running is None:
            return
        self.app.stop()
        try:
            self._running.result(timeout)
        finally:
            self.blocked += self._loop.blocking()
            self.reports += self._loop.slow.reports
            self._loop.close()
            self.app = self._loop = self._running = None

    @property
    def http_url(self) -> str:
        assert self.app is not None
        return self.app.endpoints.http_url

    @property
    def control(self) -> ControlStore:
        """The running process's own store: a desired state set here reaches its open streams at once."""
        assert self.app is not None and self.app.control_store is not None
        return self.app.control_store

    def _database(self) -> Database:
        if self._db is None:
            self._db = open_database(self.config.database_url)
        return self._db

    def add_device(self, device_id: str) -> str:
        return DeviceRegistry(self._database()).add_device(device_id)

    def revoke(self, device_id: str) -> None:
        DeviceRegistry(self._database()).revoke(device_id)

    def presence(self, device_id: str) -> DevicePresence | None:
        found = [p for p in TelemetryStore(self._database()).fleet_presence() if p.device_id == device_id]
        return found[0] if found else None

    def latest_telemetry(self, device_id: str) -> LatestTelemetry | None:
        return TelemetryStore(self._database()).latest(device_id)

    def stored_seqs(self, device_id: str) -> list[int]:
        """The seqs of the device's results in the store (what its uplink delivered)."""
        return ResultStore(self._database()).seqs(device_id)

    def reported(self, device_id: str) -> StoredReport | None:
        return ControlStore(self._database()).reported(device_id)

    def close(self) -> None:
        self.stop()
        if self._db is not None:
            self._db.close()
            self._db = None
