"""Fixtures for the cloud store: a real database on each engine (a SQLite file, a PostgreSQL schema of its own).

PostgreSQL comes from $EDGEFLEET_TEST_POSTGRES (a SQLAlchemy URL), by default the local server on
127.0.0.1:5432, database `test`. Its tests are skipped, saying why, only when that server cannot be reached.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import pytest

from cloud_sync.store import Database, DeviceRegistry, ResultStore, open_database
from edgefleet.proto.edgefleet.v1 import results_pb2


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
