"""Fixtures for telemetry ingest: a real Mosquitto per test, a real database (SQLite file or PostgreSQL
schema), registered devices, and started subscribers that are closed at teardown."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import cloud_sync.store.telemetry  # noqa: F401  (registers the telemetry tables before any schema is created)
from cloud_sync.store import Database, DeviceRegistry, open_database
from cloud_sync.store.telemetry import TelemetryStore
from cloud_sync.telemetry.subscriber import TelemetrySubscriber
from edgefleet.proto.edgefleet.v1.state_pb2 import MODEL_ROLE_ACTIVE
from edgefleet.proto.edgefleet.v1.telemetry_pb2 import LatencySummary, ModelVersionTelemetry, Telemetry
from tests.mosquitto import Mosquitto
from tests.waiting import wait_for

DEVICES = ("cam-1", "cam-2")
PREFIX = "edgefleet/v1"

MakeSubscriber = Callable[..., TelemetrySubscriber]


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    """For tests about MQTT rather than the database: SQLite only."""
    return f"sqlite:///{tmp_path / 'cloud.db'}"


def _open(url: str) -> Iterator[Database]:
    db = open_database(url)
    registry = DeviceRegistry(db)
    for device_id in DEVICES:
        registry.add_device(device_id, {"site": "lyon"})
    yield db
    db.close()


@pytest.fixture
def db(store_url: str) -> Iterator[Database]:
    """A database on each engine, with cam-1 and cam-2 registered."""
    yield from _open(store_url)


@pytest.fixture
def sqlite_db(sqlite_url: str) -> Iterator[Database]:
    yield from _open(sqlite_url)


@pytest.fixture
def pg_url(postgres_url: str) -> str:
    return postgres_url


@pytest.fixture
def pg_db(pg_url: str) -> Iterator[Database]:
    """PostgreSQL only (tests that lock a table from another connection)."""
    yield from _open(pg_url)


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Mosquitto]:
    """A broker with persistence, as deployed: sessions (and what they queued) survive its restart."""
    with Mosquitto(tmp_path / "broker", persistence=True) as running:
        yield running


@pytest.fixture
def make_subscriber() -> Iterator[MakeSubscriber]:
    """make_subscriber(store, broker, client_id=..., **options) -> a started subscriber, subscribed."""
    made: list[TelemetrySubscriber] = []

    def make(
        store: TelemetryStore, broker: Mosquitto, client_id: str = "cloud-sync-0", **options: Any
    ) -> TelemetrySubscriber:
        options.setdefault("reconnect_delay", (1, 1))
        subscriber = TelemetrySubscriber(store, broker.url, client_id=client_id, **options)
        made.append(subscriber)
        subscriber.start()
        wait_for(lambda: subscriber.ready, 10, "the subscriber to connect and subscribe")
        return subscriber

    yield make
    for subscriber in made:
        subscriber.close(timeout=5, end_session=True)


def telemetry(
    device_id: str = "cam-1",
    seq: int = 1,
    *,
    timestamp_ms: int | None = None,
    agent_start_ms: int = 1_700_000_000_000,
    models: list[ModelVersionTelemetry] | None = None,
    window_s: float = 10.0,
) -> Telemetry:
    """A valid Telemetry message; its window ends at `timestamp_ms` (default: now + seq, unique per seq)."""
    return Telemetry(
        device_id=device_id,
        timestamp_ms=timestamp_ms if timestamp_ms is not None else time.time_ns() // 1_000_000 + seq,
        window_s=window_s,
        seq=seq,
        agent_start_ms=agent_start_ms,
        models=models if models is not None else [version()],
    )


def version(
    name: str = "digits",
    number: int = 1,
    *,
    requests: int = 10,
    errors: int = 1,
    p99_ms: float = 3.0,
    **fields: Any,
) -> ModelVersionTelemetry:
    values: dict[str, Any] = {
        "name": name,
        "version": number,
        "role": MODEL_ROLE_ACTIVE,
        "requests": requests,
        "errors": errors,
        "inferences": 2 * requests,
        "latency": LatencySummary(p50_ms=min(1.0, p99_ms), p95_ms=min(2.0, p99_ms), p99_ms=p99_ms),
        "mean_batch_size": 2.0,
        "cpu_seconds": 0.01,
    }
    values.update(fields)
    return ModelVersionTelemetry(**values)
