"""Fixtures for the cloud store: a real database on each engine (a SQLite file, a PostgreSQL schema of its own).

PostgreSQL comes from $EDGEFLEET_TEST_POSTGRES (a SQLAlchemy URL), by default the local server on
127.0.0.1:5432, database `test`. Its tests are skipped, saying why, only when that server cannot be reached.
"""

from __future__ import annotations

import functools
import os
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg
import pytest
import sqlalchemy as sa

from cloud_sync.store import Database, DeviceRegistry, ResultStore, open_database
from edge_runtime.proto.edgefleet.v1 import results_pb2

POSTGRES_URL = os.environ.get("EDGEFLEET_TEST_POSTGRES", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
ENGINES = ["sqlite", "postgresql"]


def _libpq_conninfo(url: sa.URL) -> str:
    """The URL's server as a libpq conninfo string (for psycopg, without SQLAlchemy)."""
    parts = {
        "host": url.host or "127.0.0.1",
        "port": str(url.port or 5432),
        "dbname": url.database or "postgres",
        "user": url.username or "postgres",
    }
    if url.password:
        parts["password"] = str(url.password)
    return " ".join(f"{key}={value}" for key, value in parts.items())


POSTGRES_CONNINFO = _libpq_conninfo(sa.make_url(POSTGRES_URL))


@functools.cache
def postgres_unreachable() -> str | None:
    """Why the test PostgreSQL server cannot be used, or None when it can (asked once per session)."""
    try:
        with psycopg.connect(POSTGRES_CONNINFO, connect_timeout=3) as conn:
            conn.execute("SELECT 1")
    except psycopg.Error as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return f"PostgreSQL at {sa.make_url(POSTGRES_URL).render_as_string()} is not reachable ({first})"
    return None


@contextmanager
def postgres_schema_url() -> Iterator[str]:
    """A URL whose connections see only a fresh schema of their own; the schema is dropped afterwards."""
    reason = postgres_unreachable()
    if reason:
        pytest.skip(reason)
    schema = f"test_store_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(POSTGRES_CONNINFO, autocommit=True) as conn:
        conn.execute(f'CREATE SCHEMA "{schema}"')
    try:
        url = sa.make_url(POSTGRES_URL).update_query_dict({"options": f"-csearch_path={schema}"})
        yield url.render_as_string(hide_password=False)
    finally:
        with psycopg.connect(POSTGRES_CONNINFO, autocommit=True) as conn:
            # Fail, rather than hang the session, if a test left a transaction open in the schema.
            conn.execute("SET lock_timeout = '10s'")
            conn.execute(f'DROP SCHEMA "{schema}" CASCADE')


@pytest.fixture(params=ENGINES)
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A URL to an empty database: a SQLite file in tmp_path, or a PostgreSQL schema made for this test."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'cloud.db'}"
        return
    with postgres_schema_url() as url:
        yield url


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A URL to an empty PostgreSQL schema of this test's own (for PostgreSQL-only tests)."""
    with postgres_schema_url() as url:
        yield url


@pytest.fixture
def db(store_url: str) -> Iterator[Database]:
    database = open_database(store_url)
    yield database
    database.close()


@pytest.fixture
def registry(db: Database) -> DeviceRegistry:
    return DeviceRegistry(db)


@pytest.fixture
def store(db: Database) -> ResultStore:
    return ResultStore(db)


@pytest.fixture
def device(registry: DeviceRegistry) -> str:
    """A registered device's id."""
    registry.add_device("cam-1", {"site": "lyon"})
    return "cam-1"


def make_record(seq: int, **fields: object) -> results_pb2.ResultRecord:
    """A valid record with seq `seq`; `fields` override the defaults."""
    values: dict[str, object] = {
        "seq": seq,
        "created_at_ms": 1_700_000_000_000 + seq,
        "model": "digits",
        "version": 2,
        "priority": 1,
        "kind": results_pb2.RECORD_KIND_RESULT,
        "payload_type": "inference.ModelInferResponse",
        "payload": b"payload-%d" % seq,
        "request_id": f"req-{seq}",
    }
    values.update(fields)
    return results_pb2.ResultRecord(**values)


def make_batch(
    after_seq: int,
    through_seq: int,
    seqs: Iterable[int] | None = None,
    *,
    produced_total: int | None = None,
    evicted_total: int = 0,
    records: Iterable[results_pb2.ResultRecord] = (),
) -> results_pb2.ResultBatch:
    """A batch covering (after_seq, through_seq] holding `seqs` (default: all of them) or `records`."""
    batch = results_pb2.ResultBatch(
        after_seq=after_seq,
        through_seq=through_seq,
        produced_total=through_seq if produced_total is None else produced_total,
        evicted_total=evicted_total,
    )
    chosen = range(after_seq + 1, through_seq + 1) if seqs is None else seqs
    batch.records.extend(list(records) or [make_record(seq) for seq in chosen])
    return batch
