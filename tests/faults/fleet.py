"""A small real fleet for fault tests: cloud-sync and edge-agent processes, load, and the final reckoning.

Everything is a real process on loopback: the agent is killed with SIGKILL, cloud-sync is stopped and
started on the same port, the databases are real. `reckon` is the promise under test: every record the agent
committed is in the cloud store exactly once, in seq order, or accounted for as evicted or rejected, and
stored + evicted + rejected = produced on both sides.
"""

from __future__ import annotations

import itertools
import socket
import sqlite3
import subprocess
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from cloud_sync.store import DeviceRegistry, ResultStore, TelemetryStore, open_database
from edge_runtime.kserve.client import KServeClient
from tests.processes import CLOUD_SYNC, REPO_ROOT, AgentProcess, CloudSyncProcess, install, toml_text
from tests.waiting import wait_for


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Cloud:
    """cloud-sync on a fixed port, so a restart is the same endpoint to the devices."""

    workdir: Path
    database_url: str = ""
    mqtt_url: str = ""
    grpc_port: int = field(default_factory=free_port)
    proc: CloudSyncProcess | None = None

    def __post_init__(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config = self.workdir / "cloud-sync.toml"
        data: dict[str, dict[str, Any]] = {
            "server": {"data_dir": str(self.workdir / "data"), "shutdown_grace_s": 5.0},
            "grpc": {"listen": f"127.0.0.1:{self.grpc_port}"},
            "http": {"listen": "127.0.0.1:0"},
        }
        if self.database_url:
            data["database"] = {"url": self.database_url}
        if self.mqtt_url:
            data["mqtt"] = {"url": self.mqtt_url, "client_id": f"cloud-sync-{self.grpc_port}"}
        self.config.write_text(toml_text(data))
        self.url = self.database_url or f"sqlite:///{(self.workdir / 'data' / 'cloud-sync.db').resolve()}"

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def add_device(self, device_id: str) -> str:
        done = subprocess.run(
            [*CLOUD_SYNC, "add-device", device_id, "--config", str(self.config)],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=REPO_ROOT,
            check=True,
        )
        return done.stdout.strip()

    def start(self) -> None:
        self.proc = CloudSyncProcess(self.config)
        self.proc.wait_ready(60)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.signal()
            assert self.proc.finish(30) == 0, self.proc.stderr
            self.proc = None

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc = None

    def request_ids(self, device_id: str) -> set[str]:
        db = open_database(self.url, create=False)
        try:
            store, ids, after = ResultStore(db), set(), 0
            while page := store.results(device_id, after, 5000):
                ids.update(r.request_id for r in page)
                after = page[-1].id
            return ids
        finally:
            db.close()

    def seqs(self, device_id: str) -> list[int]:
        db = open_database(self.url, create=False)
        try:
            return ResultStore(db).seqs(device_id)
        finally:
            db.close()

    def reconcile(self, device_id: str) -> Any:
        db = open_database(self.url, create=False)
        try:
            return ResultStore(db).reconcile(device_id), ResultStore(db).eviction_ranges(device_id)
        finally:
            db.close()

    def rejected_seqs(self, device_id: str) -> set[int]:
        """Seqs the cloud counts as rejected (its quarantine)."""
        db = open_database(self.url, create=False)
        try:
            return {entry.seq for entry in ResultStore(db).quarantine(device_id, limit=10_000)}
        finally:
            db.close()

    def telemetry(self, device_id: str) -> tuple[Any, Any]:
        """(latest telemetry or None, presence or None) as the cloud stored them."""
        db = open_database(self.url, create=False)
        try:
            store = TelemetryStore(db)
            presence = next((p for p in store.fleet_presence() if p.device_id == device_id), None)
            return store.latest(device_id), presence
        finally:
            db.close()

    def device_exists(self, device_id: str) -> bool:
        db = open_database(self.url, create=False)
        try:
            return any(d.device_id == device_id for d in DeviceRegistry(db).list_devices())
        finally:
            db.close()


@dataclass
class Device:
    """An edge-agent with digits installed, keeping every result (upload.sample_rate = 1)."""

    workdir: Path
    socket_dir: Path
    device_id: str
    cloud: Cloud
    token: str
    digits: Path
    upload: dict[str, Any] = field(default_factory=dict)
    buffer: dict[str, Any] = field(default_factory=dict)
    mqtt: dict[str, Any] = field(default_factory=dict)
    telemetry: dict[str, Any] = field(default_factory=dict)
    proc: AgentProcess | None = None

    def __post_init__(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        token_file = self.workdir / "device-token"
        token_file.write_text(self.token + "\n")
        self.data_dir = self.workdir / "data"
        self.socket = self.socket_dir / f"{self.device_id}.sock"
        data: dict[str, dict[str, Any]] = {
            "agent": {"data_dir": str(self.data_dir), "shutdown_grace_s": 5.0},
            "server": {
                "unix_socket": str(self.socket),
                "tcp_address": "",
                "metrics_address": "",
                "http_unix_socket": "",
                "http_tcp_address": "",
            },
            "engine": {"backend": "onnxruntime", "intra_op_threads": 1, "warmup_inferences": 1},
            "inference": {"adaptive": False, "max_batch_size": 8},
            "upload": {"sample_rate": 1.0, "interval_s": 0.05, "batch_max_records": 200, **self.upload},
            "buffer": self.buffer,
            "cloud": {"grpc_target": self.cloud.target, "device_id": self.device_id, "token_file": str(token_file)},
            "mqtt": self.mqtt,
            "telemetry": self.telemetry,
        }
        self.config = self.workdir / "edge-agent.toml"
        self.config.write_text(toml_text({k: v for k, v in data.items() if v}))
        install(data, self.digits)

    def start(self) -> None:
        self.proc = AgentProcess(self.config)
        self.proc.wait_ready(60)

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc = None

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.signal()
            assert self.proc.finish(30) == 0, self.proc.stderr
            self.proc = None

    def counters(self) -> dict[str, int]:
        """The outbox's committed counters, read beside the agent (WAL readers never block the writer)."""
        conn = sqlite3.connect(f"file:{self.data_dir / 'outbox.db'}?mode=ro", uri=True, timeout=10)
        try:
            return {str(name): int(value) for name, value in conn.execute("SELECT name, value FROM counters")}
        finally:
            conn.close()


class Load:
    """Apps on the device: threads calling digits over the Unix socket, riding out agent restarts.

    With `keep`, each request asks for its result to be kept; `kept_ids` collects the ids of those the
    agent answered as kept (committed to its outbox): each of them must reach the cloud.
    """

    def __init__(self, socket_path: Path, threads: int = 2, keep: bool = False) -> None:
        self._socket = socket_path
        self._keep = keep
        self._stop = threading.Event()
        self.answered = 0
        self.kept_ids: list[str] = []
        self._ids = itertools.count()
        self._lock = threading.Lock()
        self._x = np.random.default_rng(0).integers(0, 17, size=(1, 64)).astype(np.float32)
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(threads)]
        for t in self._threads:
            t.start()

    def _run(self) -> None:
        client = KServeClient(f"unix:{self._socket}", timeout_s=5)
        try:
            while not self._stop.is_set():
                request_id = f"r{next(self._ids)}"
                try:
                    reply = client.infer("digits", {"pixels": self._x}, keep=self._keep, request_id=request_id)
                except grpc.RpcError:
                    self._stop.wait(0.05)  # the agent is down or restarting: try again shortly
                    continue
                with self._lock:
                    self.answered += 1
                    if reply.parameters.get("edgefleet.kept") is True:
                        self.kept_ids.append(request_id)
        finally:
            client.close()

    def wait_answers(self, more: int, timeout: float = 30) -> None:
        start = self.answered
        wait_for(lambda: self.answered >= start + more, timeout, f"{more} more answers from the agent")

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(15)


def reckon(cloud: Cloud, device: Device, timeout: float = 90) -> dict[str, int]:
    """Wait until the agent has uploaded everything it committed, then check exactly-once and the counts:
    stored + evicted + rejected = produced, by the cloud's counters and by the agent's own, which agree."""

    def drained() -> dict[str, int] | None:
        c = device.counters()
        return c if c["acked_seq"] == c["last_seq"] and c["depth"] == 0 and c.get("quarantined", 0) == 0 else None

    def still() -> tuple[dict[str, int], list[int], Any, Any, set[int]] | None:
        """The cloud's figures read while the agent produced nothing new (an event of its start may land
        between two reads of a live system): drained before and the same last seq after."""
        c = drained()
        if c is None:
            return None
        seqs = cloud.seqs(device.device_id)
        reconciliation, ranges = cloud.reconcile(device.device_id)
        rejected = cloud.rejected_seqs(device.device_id)
        return (c, seqs, reconciliation, ranges, rejected) if device.counters()["last_seq"] == c["last_seq"] else None

    found = wait_for(still, timeout, "the agent's outbox to drain to the cloud", poll=0.1)
    counters, seqs, reconciliation, ranges, rejected = found
    evicted = {s for low, high in ranges for s in range(low, high + 1)}
    assert seqs == sorted(set(seqs)), "a record is stored twice, or out of seq order"
    assert not evicted & set(seqs), "a seq is both stored and declared evicted"
    assert not rejected & (set(seqs) | evicted), "a seq is both rejected and stored or evicted"
    assert set(seqs) | evicted | rejected == set(range(1, counters["last_seq"] + 1)), "a committed record is missing"
    assert reconciliation.stored == len(seqs)
    assert reconciliation.stored + reconciliation.evicted + reconciliation.rejected == counters["produced_total"]
    assert reconciliation.evicted == counters["evicted_total"] == len(evicted)
    assert reconciliation.rejected == counters.get("rejected_total", 0) == len(rejected)
    assert reconciliation.stored == counters["delivered_total"]
    return {
        "stored": len(seqs),
        "evicted": len(evicted),
        "rejected": len(rejected),
        "produced": counters["produced_total"],
    }
