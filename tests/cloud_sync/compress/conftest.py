"""A real admin API app (uvicorn on a free port) with the registry, compress and rollout routes, over real SQLite.

The compress route is not yet in cloud-sync's process (its registration is the lead's change), so the app is
built here as process.py builds it: the same route factories, stores and error mapping.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import uvicorn
from prometheus_client import CollectorRegistry

import cloud_sync.rollouts.store  # noqa: F401  (registers the rollout tables before the schema is made)
from cloud_sync.api import ApiContext, create_app
from cloud_sync.api_auth import BearerAuth
from cloud_sync.api_compress import compress_routes
from cloud_sync.api_models import model_routes
from cloud_sync.api_rollouts import rollout_routes
from cloud_sync.reconciler import Reconciler
from cloud_sync.registry import DirectoryBlobStore, FleetSigner, ModelRegistry
from cloud_sync.rollouts.service import RolloutService
from cloud_sync.rollouts.store import RolloutStore
from cloud_sync.store import Database, DeviceRegistry, ResultStore, open_database
from cloud_sync.store.assignments import AssignmentStore
from cloud_sync.store.audit import AuditLog
from cloud_sync.store.control import ControlStore
from cloud_sync.store.policies import PolicyStore
from tests.loopcheck import LoopThread

OPERATOR, VIEWER = "operator-secret-0123456789", "viewer-secret-0123456789"
# Small, so that the limit is cheap to pass: digits:2 is 19,740 bytes.
MAX_PARENT_BYTES = 1_000_000
FAR_FUTURE_MS = 4_102_444_800_000


@dataclass
class CompressCloud:
    db: Database
    registry: ModelRegistry
    devices: DeviceRegistry
    assignments: AssignmentStore
    audit: AuditLog
    url: str
    api: httpx.Client

    def push(self, model: bytes, manifest: dict[str, Any], warmup: bytes | None = None) -> dict[str, Any]:
        """Store the blobs and register the version, as `fleetctl models push` does through the API."""
        for data in (model, warmup):
            if data is not None:
                response = self.api.put(f"/v1/blobs/{hashlib.sha256(data).hexdigest()}", content=data)
                assert response.status_code == 200, response.text
        response = self.api.post("/v1/models", json={"manifest": manifest})
        assert response.status_code == 201, response.text
        found: dict[str, Any] = response.json()
        return found

    def upload(self, data: bytes) -> str:
        sha = hashlib.sha256(data).hexdigest()
        response = self.api.put(f"/v1/blobs/{sha}", content=data)
        assert response.status_code == 200, response.text
        return sha

    def versions(self, name: str = "digits") -> list[int]:
        return [v.version for v in self.registry.list(name)]


def npz_bytes(arrays: dict[str, np.ndarray], tmp: Path) -> bytes:
    from edge_runtime.models.package import write_npz

    path = tmp / f"calibration-{len(list(tmp.glob('*.npz')))}.npz"
    write_npz(path, arrays)
    return path.read_bytes()


@pytest.fixture(scope="session")
def digits2(tmp_path_factory: pytest.TempPathFactory) -> tuple[bytes, dict[str, Any]]:
    """digits:2 as models/build.py makes it (alone: the whole set takes a minute): (model.onnx bytes, manifest)."""
    from models.build import build_digits

    directory = build_digits(tmp_path_factory.mktemp("models"), 2).directory
    return (directory / "model.onnx").read_bytes(), json.loads((directory / "manifest.json").read_bytes())


@pytest.fixture(scope="session")
def training_rows() -> np.ndarray:
    """Digits rows the model was trained on (not the holdout): calibration data as an operator would upload."""
    from models.build import _digits_split

    return np.ascontiguousarray(_digits_split()[0][:512].astype(np.float32))


@pytest.fixture
def cloud(tmp_path: Path, digits2: tuple[bytes, dict[str, Any]]) -> Iterator[CompressCloud]:
    db = open_database(f"sqlite:///{tmp_path / 'cloud.db'}")
    registry = ModelRegistry(db, DirectoryBlobStore(tmp_path / "blobs"), FleetSigner.open(tmp_path / "fleet.key"))
    auth = BearerAuth({OPERATOR: "operator", VIEWER: "viewer"})
    audit = AuditLog(db)
    devices, assignments = DeviceRegistry(db), AssignmentStore(db)
    reconciler = Reconciler(devices, assignments, PolicyStore(db), registry, ControlStore(db), RolloutStore(db))
    service = RolloutService(db, reconciler, assignments, registry, devices)
    routes = [
        model_routes(registry, auth, registry.assigned, 64 * 1024 * 1024, audit),
        compress_routes(db, registry, auth, audit, max_parent_bytes=MAX_PARENT_BYTES),
        rollout_routes(service, auth),
    ]
    app = create_app(ApiContext(devices, ResultStore(db), auth, CollectorRegistry(), routes, audit=audit))
    sock = socket.create_server(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_config=None, access_log=False, lifespan="off"))
    loop = LoopThread("compress-http-loop")
    serving = asyncio.run_coroutine_threadsafe(server.serve(sockets=[sock]), loop.loop)
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    try:
        with httpx.Client(
            base_url=url, headers={"Authorization": f"Bearer {OPERATOR}"}, timeout=120, trust_env=False
        ) as api:
            running = CompressCloud(db, registry, devices, assignments, audit, url, api)
            running.push(*digits2)
            yield running
    finally:
        server.should_exit = True
        serving.result(10)
        loop.close()
        db.close()
    assert not loop.blocking(), loop.blocking()
