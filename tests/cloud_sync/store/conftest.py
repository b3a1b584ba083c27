"""Fixtures for the cloud store: a real database on each engine (a SQLite file, a PostgreSQL schema of its own).

PostgreSQL comes from $EDGEFLEET_TEST_POSTGRES (a SQLAlchemy URL), by default the local server on
127.0.0.1:5432, database `test`. Its tests are skipped, saying why, only when that server cannot be reached.
"""

from __future__ import annotations

from collections.abc import Iterable

import pytest

from cloud_sync.store import Database, DeviceRegistry, ResultStore
from cloud_sync.store.batches import record_checksum
from edgefleet.proto.edgefleet.v1 import results_pb2


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
    """A valid record with seq `seq` and its checksum; `fields` override the defaults (the checksum is computed
    after them, unless given)."""
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
    record = results_pb2.ResultRecord(**values)
    if "checksum" not in fields:
        record.checksum = record_checksum(record)
    return record


def make_batch(
    after_seq: int,
    through_seq: int,
    seqs: Iterable[int] | None = None,
    *,
    produced_total: int | None = None,
    evicted_total: int | None = None,
    records: Iterable[results_pb2.ResultRecord] = (),
    rejected: Iterable[int] = (),
    rejected_total: int | None = None,
    checksums: bool = True,
) -> results_pb2.ResultBatch:
    """A batch covering (after_seq, through_seq] holding `seqs` (default: all of them but `rejected`) or
    `records`, declaring `rejected` quarantined on the device.

    The device's counters default to what a device that produced up to through_seq reports when this batch is
    the first to leave anything out: produced through_seq, evicted the seqs the batch leaves out, rejected
    those it declares. Tests of several batches with evictions pass the counters the device would have.
    """
    declared = list(rejected)
    chosen = [s for s in range(after_seq + 1, through_seq + 1) if s not in declared] if seqs is None else list(seqs)
    carried = list(records) or [make_record(seq) for seq in chosen]
    missing = through_seq - after_seq - len(carried) - len(declared)
    batch = results_pb2.ResultBatch(
        after_seq=after_seq,
        through_seq=through_seq,
        produced_total=through_seq if produced_total is None else produced_total,
        evicted_total=max(missing, 0) if evicted_total is None else evicted_total,
        rejected_total=len(declared) if rejected_total is None else rejected_total,
        record_checksum=results_pb2.RECORD_CHECKSUM_CRC32 if checksums else results_pb2.RECORD_CHECKSUM_NONE,
    )
    batch.records.extend(carried)
    batch.rejected.extend(results_pb2.Rejection(seq=seq, reason="checksum mismatch") for seq in declared)
    return batch
