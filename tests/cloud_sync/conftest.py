"""Fixtures for cloud-sync as operators and devices meet it: one real `cloud-sync run` for the session.

The process listens on ports the OS picks (read from its `cloud_sync.ready` event); devices upload through a
real gRPC channel, the admin API is reached with httpx. Each test registers devices of its own, so tests
share the process without sharing state.
"""

from __future__ import annotations

import itertools
import subprocess
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import httpx
import numpy as np
import pytest

from cloud_sync.store import ControlStore, Database, DeviceRegistry, open_database
from cloud_sync.store.assignments import AssignmentStore
from edge_runtime.inference.types import InferResponse
from edge_runtime.kserve.codec import encode_response
from edgefleet.proto.edgefleet.v1 import results_pb2, services_pb2_grpc
from tests.postgres import ENGINES, postgres_schema_url
from tests.processes import CLOUD_SYNC, CloudSyncProcess, run_program, run_side_by_side, toml_text

# Small, so that a test can send a message past it cheaply.
MAX_MESSAGE_BYTES = 64 * 1024
UPLOAD_METHOD = "/edgefleet.v1.Uplink/Upload"

_device_numbers = itertools.count(1)


def run_cloud_sync_cli(*args: str | Path, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """`cloud-sync ARGS...` as a real process."""
    return run_program(CLOUD_SYNC, *args, timeout=timeout)


def run_cloud_sync_cli_all(
    runs: Mapping[str, Sequence[str | Path]], timeout: float = 60
) -> dict[str, subprocess.CompletedProcess[str]]:
    """Independent `cloud-sync` invocations side by side, by name."""
    return run_side_by_side(CLOUD_SYNC, runs, timeout)


def cloud_sync_config(workdir: Path, **sections: Mapping[str, Any]) -> Path:
    """A config file for a cloud-sync of its own in `workdir` (ports picked by the OS), with `sections` over it."""
    data: dict[str, dict[str, Any]] = {
        "server": {"data_dir": str(workdir / "data"), "shutdown_grace_s": 2.0},
        "grpc": {"listen": "127.0.0.1:0", "max_message_bytes": MAX_MESSAGE_BYTES},
        "http": {"listen": "127.0.0.1:0"},
    }
    for name, values in sections.items():
        data.setdefault(name, {}).update(values)
    path = workdir / "cloud-sync.toml"
    path.write_text(toml_text(data))
    return path


def record(
    seq: int,
    *,
    kind: int = results_pb2.RECORD_KIND_RESULT,
    payload: bytes = b"",
    payload_type: str = "inference.ModelInferResponse",
    model: str = "digits",
    version: int = 1,
) -> results_pb2.ResultRecord:
    return results_pb2.ResultRecord(
        seq=seq,
        created_at_ms=int(time.time() * 1000),
        model=model,
        version=version,
        priority=100,
        kind=kind,  # type: ignore[arg-type]  # an unknown kind on purpose in some tests
        payload_type=payload_type,
        payload=payload or f"payload {seq}".encode(),
        request_id=f"req-{seq}",
    )


def batch(
    after_seq: int,
    through_seq: int,
    seqs: Iterable[int] | None = None,
    *,
    records: Sequence[results_pb2.ResultRecord] = (),
) -> results_pb2.ResultBatch:
    """A batch covering (after_seq, through_seq] holding `records`, or a plain record for each of `seqs`."""
    chosen = range(after_seq + 1, through_seq + 1) if seqs is None else seqs
    out = results_pb2.ResultBatch(after_seq=after_seq, through_seq=through_seq, produced_total=through_seq)
    out.records.extend(list(records) or [record(seq) for seq in chosen])
    return out


def digits_payload(probabilities: Sequence[float], request_id: str = "") -> bytes:
    """A serialized inference.ModelInferResponse of the digits model, as the agent keeps it."""
    array = np.asarray([probabilities], dtype=np.float32)
    response = InferResponse("digits", "1", {"probabilities": array}, id=request_id)
    return encode_response(response).SerializeToString()


@dataclass
class RunningCloudSync:
    """A running `cloud-sync run` and the ways in: its admin API, its gRPC target, its admin token."""

    proc: CloudSyncProcess
    config_path: Path
    http_url: str
    grpc_target: str
    admin_token: str
    api: httpx.Client
    channel: grpc.Channel

    def new_device(self, prefix: str = "dev", labels: Mapping[str, str] | None = None) -> tuple[str, str]:
        """Register a device with an id no other test uses; (device_id, token)."""
        device_id = f"{prefix}-{next(_device_numbers)}"
        response = self.api.post("/v1/devices", json={"device_id": device_id, "labels": dict(labels or {})})
        assert response.status_code == 201, response.text
        return device_id, response.json()["token"]

    def upload(
        self, token: str | None, batches: Iterable[results_pb2.ResultBatch], timeout: float = 10
    ) -> results_pb2.UploadAck:
        """One Upload stream carrying `batches`, as the device with `token` (None: no credential at all)."""
        metadata = [("authorization", f"Bearer {token}")] if token is not None else None
        stub = services_pb2_grpc.UplinkStub(self.channel)
        ack: results_pb2.UploadAck = stub.Upload(iter(list(batches)), metadata=metadata, timeout=timeout)
        return ack

    def device(self, device_id: str) -> dict[str, Any]:
        response = self.api.get(f"/v1/devices/{device_id}")
        assert response.status_code == 200, response.text
        body: dict[str, Any] = response.json()
        return body

    def results(self, device_id: str) -> list[dict[str, Any]]:
        """Every stored result of the device, in id order, paging through /v1/results."""
        rows: list[dict[str, Any]] = []
        after = 0
        while True:
            response = self.api.get("/v1/results", params={"device_id": device_id, "after_id": after, "limit": 100})
            assert response.status_code == 200, response.text
            page = response.json()
            rows.extend(page["results"])
            if not page["results"]:
                return rows
            after = page["next_after_id"]


@pytest.fixture(params=ENGINES)
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A URL to an empty database: a SQLite file in tmp_path, or a PostgreSQL schema made for this test."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'cloud.db'}"
        return
    with postgres_schema_url() as url:
        yield url


@pytest.fixture
def db(store_url: str) -> Iterator[Database]:
    """The cloud store on `store_url`'s engine (each engine in turn), closed after the test."""
    database = open_database(store_url)
    try:
        yield database
    finally:
        database.close()


@pytest.fixture
def devices(db: Database) -> DeviceRegistry:
    return DeviceRegistry(db)


@pytest.fixture
def assignments(db: Database) -> AssignmentStore:
    return AssignmentStore(db)


@pytest.fixture
def control(db: Database) -> ControlStore:
    return ControlStore(db)


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A URL to an empty PostgreSQL schema of this test's own (for PostgreSQL-only tests)."""
    with postgres_schema_url() as url:
        yield url


@pytest.fixture(scope="session")
def cloud_sync(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningCloudSync]:
    """One `cloud-sync run` for the session (SQLite in a temporary data dir); stopped with SIGTERM at the end."""
    workdir = tmp_path_factory.mktemp("cloud-sync")
    config_path = cloud_sync_config(workdir)
    proc = CloudSyncProcess(config_path)
    try:
        ready = proc.wait_ready(60)
        token = run_cloud_sync_cli("admin-token", "--config", config_path)
        assert token.returncode == 0, token.stderr
        admin_token = token.stdout.strip()
        api = httpx.Client(
            base_url=ready["http"], headers={"Authorization": f"Bearer {admin_token}"}, timeout=30, trust_env=False
        )
        channel = grpc.insecure_channel(ready["grpc"])
        running = RunningCloudSync(proc, config_path, ready["http"], ready["grpc"], admin_token, api, channel)
    except BaseException:
        proc.kill()
        raise
    try:
        yield running
    finally:
        channel.close()
        api.close()
        if proc.proc.poll() is None:
            proc.signal()
        code = proc.finish(30)
    assert code == 0, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
