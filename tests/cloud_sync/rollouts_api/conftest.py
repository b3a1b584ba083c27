"""Fixtures for the rollout and compare routes: the session's real cloud-sync, and its own database file.

Telemetry reaches the cloud store over MQTT in production; these tests write windows straight into the
running cloud-sync's SQLite file through the real TelemetryStore (the store, not the transport, is under test).
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterator, Sequence

import pytest

import cloud_sync.store.telemetry  # noqa: F401  (registers the telemetry tables before any schema is created)
from cloud_sync.store import Database, open_database
from cloud_sync.store.telemetry import TelemetryReceived, TelemetryStore
from edgefleet.proto.edgefleet.v1.state_pb2 import MODEL_ROLE_ACTIVE
from edgefleet.proto.edgefleet.v1.telemetry_pb2 import LatencySummary, ModelVersionTelemetry, Telemetry
from tests.cloud_sync.conftest import RunningCloudSync

_seqs = itertools.count(1)


@pytest.fixture(scope="session")
def cloud_db(cloud_sync: RunningCloudSync) -> Iterator[Database]:
    """The session cloud-sync's own database (its config keeps it in data_dir/cloud-sync.db)."""
    path = cloud_sync.config_path.parent / "data" / "cloud-sync.db"
    assert path.is_file(), path
    db = open_database(f"sqlite:///{path}")
    yield db
    db.close()


def window(
    name: str,
    number: int,
    *,
    requests: int,
    errors: int = 0,
    p50_ms: float = 1.0,
    p95_ms: float = 2.0,
    p99_ms: float = 3.0,
    inferences: int | None = None,
    cpu_seconds: float = 0.0,
    energy_joules: float = 0.0,
) -> ModelVersionTelemetry:
    return ModelVersionTelemetry(
        name=name,
        version=number,
        role=MODEL_ROLE_ACTIVE,
        requests=requests,
        errors=errors,
        inferences=inferences if inferences is not None else requests,
        latency=LatencySummary(p50_ms=p50_ms, p95_ms=p95_ms, p99_ms=p99_ms),
        mean_batch_size=1.0,
        cpu_seconds=cpu_seconds,
        energy_joules=energy_joules,
    )


def send_windows(db: Database, device_id: str, models: Sequence[ModelVersionTelemetry], ago_s: float = 1.0) -> None:
    """One 10 s telemetry window of `device_id`, ending `ago_s` ago, as the subscriber stores it."""
    now = int(time.time() * 1000)
    message = Telemetry(
        device_id=device_id,
        timestamp_ms=now - int(ago_s * 1000),
        window_s=10.0,
        seq=next(_seqs),
        agent_start_ms=1_700_000_000_000,
        models=list(models),
    )
    TelemetryStore(db).write([TelemetryReceived(device_id, message, message.SerializeToString(), now)])
