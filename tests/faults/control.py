"""The control plane as fault tests see it: a real Mosquitto, a real cloud-sync process with its registry and
admin API, edge-agent processes that converge to what it assigns, and a TCP proxy that slows or cuts the
artifact downloads.

Built on tests/faults/fleet.py (Cloud, Device: the processes) and tests/mosquitto.py. The cloud's state is
read from its own database (SQLite, WAL: readers never block cloud-sync), the devices' from their data
directories and their KServe endpoints. Not for assertions: the tests make them.
"""

from __future__ import annotations

import itertools
import json
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import httpx
import numpy as np
import sqlalchemy as sa

from cloud_sync.admin_token import admin_token
from cloud_sync.registry.signer import SIGNING_KEY_FILE
from cloud_sync.rollouts.plan import Rollout, RolloutEvent
from cloud_sync.rollouts.store import RolloutStore
from cloud_sync.store import DeviceRegistry, open_database
from cloud_sync.store.control import ControlStore
from edge_runtime._compat import tomllib
from edge_runtime.kserve.client import KServeClient
from edge_runtime.models.store import ModelStore
from edgefleet.proto.edgefleet.v1.state_pb2 import MODEL_STATE_FAILED, DesiredState, ReportedState
from tests.faults.fleet import Cloud, Device
from tests.processes import toml_text
from tests.waiting import wait_for

__all__ = ["ControlCloud", "ControlDevice", "PacedLoad", "TcpProxy", "package_with_version", "terminal"]

DIGITS_INPUT = np.zeros((1, 64), dtype=np.float32)


class TcpProxy:
    """127.0.0.1:`port` -> 127.0.0.1:`target_port`, counting the bytes the server sends back.

    `rate` (bytes/s, None: unlimited) paces server -> client bytes; `cuts` holds, per new connection in order,
    how many server -> client bytes it may carry before the proxy resets both sides (a cable pulled
    mid-stream); connections past the list are never cut. Both may be changed while it runs.
    """

    PIECE = 4096

    def __init__(self, target_port: int, *, rate: float | None = None, cuts: list[int] | None = None) -> None:
        self.target_port = target_port
        self.rate = rate
        self.cuts = list(cuts or [])
        self.downstream = 0  # server -> client bytes forwarded, over every connection
        self.connections = 0
        self.cut = 0  # connections reset by the proxy
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self._listener.getsockname()[1])
        self._open: list[socket.socket] = []
        threading.Thread(target=self._accept, name="tcp-proxy", daemon=True).start()

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(("127.0.0.1", self.target_port), timeout=5)
            except OSError:
                client.close()
                continue
            server.settimeout(None)
            with self._lock:
                self.connections += 1
                budget = self.cuts.pop(0) if self.cuts else None
                self._open += [client, server]
            threading.Thread(target=self._pipe, args=(client, server), daemon=True).start()
            threading.Thread(target=self._down, args=(server, client, budget), daemon=True).start()

    def _pipe(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            _reset(source, sink)

    def _down(self, server: socket.socket, client: socket.socket, budget: int | None) -> None:
        carried = 0
        try:
            while data := server.recv(self.PIECE):
                if budget is not None and carried + len(data) >= budget:
                    data = data[: budget - carried]
                    client.sendall(data)
                    with self._lock:
                        self.downstream += len(data)
                        self.cut += 1
                    return
                began = time.monotonic()
                client.sendall(data)
                carried += len(data)
                with self._lock:
                    self.downstream += len(data)
                rate = self.rate
                if rate:
                    # Pacing is the fault itself (a slow link), not a test waiting on something.
                    time.sleep(max(0.0, len(data) / rate - (time.monotonic() - began)))
        except OSError:
            pass
        finally:
            _reset(server, client)

    def close(self) -> None:
        self._listener.close()
        with self._lock:
            sockets, self._open = self._open, []
        _reset(*sockets)


def _reset(*sockets: socket.socket) -> None:
    """Close with RST (linger 0): the peer sees the connection die, not a clean end of stream.

    shutdown(SHUT_RD) first wakes the other pipe thread blocked in recv on it: while a thread is inside recv the
    kernel keeps the socket open, and the RST would wait for the peer's next keepalive."""
    for s in sockets:
        try:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
            s.shutdown(socket.SHUT_RD)
        except OSError:
            pass
        s.close()


def package_with_version(source: Path, out: Path, version: int, *, name: str | None = None) -> Path:
    """A copy of the package at `source` as `version` (same files; the manifest names the new version)."""
    manifest = json.loads((source / "manifest.json").read_text())
    manifest["version"] = version
    if name is not None:
        manifest["name"] = name
    target = out / f"{manifest['name']}-{version}"
    target.mkdir(parents=True, exist_ok=True)
    for item in source.iterdir():
        if item.name != "manifest.json":
            (target / item.name).write_bytes(item.read_bytes())
    (target / "manifest.json").write_text(json.dumps(manifest, sort_keys=True))
    return target


def terminal(report: ReportedState | None, generation: int) -> bool:
    """The cloud sees the device done with `generation`: converged, or a model FAILED with its reason."""
    if report is None or report.generation != generation:
        return False
    return report.converged or any(m.state == MODEL_STATE_FAILED and m.reason for m in report.models)


@dataclass
class ControlCloud:
    """cloud-sync (fleet.Cloud, on a fixed gRPC port) wired to a broker; admin API, registry and stores.

    `settings` are laid over fleet.Cloud's config, section by section (e.g. {"rollouts": {"tick_s": 0.5}}).
    """

    workdir: Path
    mqtt_url: str
    settings: dict[str, dict[str, Any]] = field(default_factory=dict)
    cloud: Cloud = field(init=False)
    http_url: str = ""

    def __post_init__(self) -> None:
        self.cloud = Cloud(self.workdir, mqtt_url=self.mqtt_url)
        self.data_dir = self.workdir / "data"
        if self.settings:
            data = tomllib.loads(self.cloud.config.read_text())
            for section, values in self.settings.items():
                data.setdefault(section, {}).update(values)
            self.cloud.config.write_text(toml_text(data))

    @property
    def target(self) -> str:
        return self.cloud.target

    @property
    def grpc_port(self) -> int:
        return self.cloud.grpc_port

    def start(self) -> None:
        self.cloud.start()
        assert self.cloud.proc is not None
        ready = self.cloud.proc.find("cloud_sync.ready")
        assert ready is not None
        self.http_url = str(ready["http"])

    def restart(self) -> None:
        self.cloud.stop()
        self.start()

    def kill(self) -> None:
        self.cloud.kill()

    @contextmanager
    def api(self) -> Iterator[httpx.Client]:
        headers = {"Authorization": f"Bearer {admin_token(self.data_dir)}"}
        with httpx.Client(base_url=self.http_url, headers=headers, trust_env=False, timeout=30) as client:
            yield client

    def call(self, method: str, path: str, **options: Any) -> Any:
        with self.api() as client:
            response = client.request(method, path, **options)
        assert response.status_code < 300, f"{method} {path}: {response.status_code} {response.text}"
        return response.json() if response.content else None

    @contextmanager
    def db(self) -> Iterator[Any]:
        database = open_database(self.cloud.url, create=False)
        try:
            yield database
        finally:
            database.close()

    # -- the registry ----------------------------------------------------------------------------------------

    def signing_key(self) -> bytes:
        return bytes.fromhex(self.call("GET", "/v1/fleet/signing-key")["public_key"])

    @property
    def signing_key_file(self) -> Path:
        return self.data_dir / SIGNING_KEY_FILE

    def push(self, package: Path, *, expires_in_s: int | None = None) -> dict[str, Any]:
        """Upload a package directory's blobs and register its manifest (what `fleetctl models push` does)."""
        manifest = json.loads((package / "manifest.json").read_text())
        files = [(manifest["sha256"], package / "model.onnx")]
        warmup = manifest.get("warmup") or {}
        if warmup.get("file"):
            files.append((warmup["sha256"], package / warmup["file"]))
        with self.api() as client:
            for sha, path in files:
                response = client.put(f"/v1/blobs/{sha}", content=path.read_bytes())
                assert response.status_code < 300, response.text
        body: dict[str, Any] = {"manifest": manifest}
        if expires_in_s is not None:
            body["expires_in_s"] = expires_in_s
        created: dict[str, Any] = self.call("POST", "/v1/models", json=body)
        return created

    def blob_path(self, sha256: str) -> Path:
        return self.data_dir / "blobs" / "sha256" / sha256[:2] / sha256

    def version_row(self, name: str, version: int) -> dict[str, Any]:
        from cloud_sync.registry.store import model_versions

        with self.db() as db:
            query = sa.select(model_versions).where(model_versions.c.name == name, model_versions.c.version == version)
            row = db.read(lambda conn: conn.execute(query).one())
        return dict(row._mapping)

    def set_version_row(self, name: str, version: int, **values: Any) -> None:
        """Write columns of a registered version as they are (what an attacker with the database can do)."""
        from cloud_sync.registry.store import model_versions

        with self.db() as db:
            statement = (
                sa.update(model_versions)
                .where(model_versions.c.name == name, model_versions.c.version == version)
                .values(**values)
            )
            db.write(lambda conn: conn.execute(statement))

    # -- devices and their states -------------------------------------------------------------------------------

    def add_device(self, device_id: str, labels: dict[str, str]) -> str:
        with self.db() as db:
            return DeviceRegistry(db).add_device(device_id, labels)

    def assign(self, name: str, version: int, selector: dict[str, str]) -> None:
        """Assign name:version to `selector`'s devices (their desired states are written before it answers)."""
        self.call("PUT", "/v1/assignments", json={"model": name, "version": version, "selector": selector})

    def desired(self, device_id: str) -> DesiredState | None:
        with self.db() as db:
            return ControlStore(db).desired(device_id)

    def reported(self, device_id: str) -> ReportedState | None:
        with self.db() as db:
            found = ControlStore(db).reported(device_id)
        return None if found is None else found.state

    def wait_desired(self, device_id: str, name: str, version: int, timeout: float = 30) -> DesiredState:
        def assigned() -> DesiredState | None:
            state = self.desired(device_id)
            return state if state and any((m.name, m.version) == (name, version) for m in state.models) else None

        state = wait_for(assigned, timeout, f"{device_id}'s desired state to name {name}:{version}")
        assert state is not None
        return state

    # -- rollouts (read from the database: they go on while cloud-sync is away) -----------------------------------

    def rollout(self, rollout_id: str) -> Rollout:
        with self.db() as db:
            return RolloutStore(db).get(rollout_id)

    def rollout_events(self, rollout_id: str) -> list[RolloutEvent]:
        with self.db() as db:
            return RolloutStore(db).events(rollout_id)

    def wait_rollout(self, rollout_id: str, reached: Any, timeout: float, what: str) -> Rollout:
        """The rollout once `reached(rollout)` holds (e.g. a stage index, a state)."""

        def seen() -> Rollout | None:
            rollout = self.rollout(rollout_id)
            return rollout if reached(rollout) else None

        try:
            found = wait_for(seen, timeout, f"rollout {rollout_id} {what}", poll=0.05)
        except AssertionError as exc:
            raise AssertionError(f"{exc}; the rollout: {self.rollout(rollout_id)}") from None
        assert found is not None
        return found

    def wait_reported(self, device_id: str, generation: int, timeout: float = 60) -> ReportedState:
        """The cloud's stored report of `device_id` once it is terminal for `generation`."""

        def done() -> ReportedState | None:
            report = self.reported(device_id)
            return report if terminal(report, generation) else None

        try:
            report = wait_for(done, timeout, f"the cloud to see {device_id} done with generation {generation}")
        except AssertionError as exc:
            raise AssertionError(f"{exc}; the cloud's last report: {self.reported(device_id)}") from None
        assert report is not None
        return report


class PacedLoad:
    """An app on a device: one thread calling `name` with the held-out digits in turn over the agent's Unix
    socket, one call every `pace_s` (riding out errors: a switch may answer a call with one). Light, so several
    agents share two cores; rollout gates need requests on every version they judge."""

    def __init__(self, socket_path: Path, name: str = "digits", pace_s: float = 0.02) -> None:
        from models.build import digits_holdout

        self._rows = digits_holdout()[0]  # real digits, as an app sends: versions are compared on what they answer
        self._socket = socket_path
        self._name = name
        self._pace_s = pace_s
        self._stop = threading.Event()
        self.answered: dict[str, int] = {}  # model version -> answers
        self.failed = 0
        self._count = itertools.count()
        self._thread = threading.Thread(target=self._run, name=f"load-{socket_path.name}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        client = KServeClient(f"unix:{self._socket}", timeout_s=5)
        try:
            while not self._stop.wait(self._pace_s):  # the pace of the app, not a wait on the system under test
                n = next(self._count)
                row = self._rows[n % len(self._rows) : n % len(self._rows) + 1]
                try:
                    reply = client.infer(self._name, {"pixels": row}, request_id=f"p{n}")
                except grpc.RpcError:
                    self.failed += 1
                    continue
                self.answered[reply.model_version] = self.answered.get(reply.model_version, 0) + 1
        finally:
            client.close()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(15)


@dataclass
class ControlDevice(Device):
    """A fleet.Device (digits:1 installed and active) that also pins the fleet key and may reach cloud-sync's
    gRPC through another address (a TcpProxy); `engine` settings are laid over the defaults."""

    signing_key: bytes = b""
    grpc_target: str = ""
    engine: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        super().__post_init__()
        data = tomllib.loads(self.config.read_text())
        key_file = self.workdir / "fleet-signing.pub"
        key_file.write_bytes(self.signing_key)
        data["cloud"]["signing_key_file"] = str(key_file)
        if self.grpc_target:
            data["cloud"]["grpc_target"] = self.grpc_target
        data["engine"].update(self.engine)
        self.config.write_text(toml_text(data))
        self.store = ModelStore(self.data_dir / "models")

    def active_version(self, name: str = "digits") -> int | None:
        pointer = self.store.active(name)
        return None if pointer is None else pointer.version

    def answering_version(self, name: str = "digits") -> int:
        with KServeClient(f"unix:{self.socket}", timeout_s=10) as client:
            return int(client.infer(name, {"pixels": DIGITS_INPUT}).model_version)

    def agreed_version(self, name: str = "digits", timeout: float = 20) -> int:
        """The version both the store's active pointer and KServe name (read until a read is stable: a
        converging agent may switch between the reads)."""

        def agreed() -> int | None:
            before = self.active_version(name)
            answering = self.answering_version(name)
            with KServeClient(f"unix:{self.socket}", timeout_s=10) as client:
                ready = client.model_ready(name, str(answering))
            after = self.active_version(name)
            return answering if before == answering == after and ready else None

        version = wait_for(agreed, timeout, f"{self.device_id}'s active pointer and KServe to agree on {name}")
        assert version is not None
        return version

    def loaded_versions(self, name: str = "digits") -> list[str]:
        with KServeClient(f"unix:{self.socket}", timeout_s=10) as client:
            return list(client.model_metadata(name).versions)
