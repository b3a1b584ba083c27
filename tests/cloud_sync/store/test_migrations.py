"""Schema migrations on both engines, from a database made exactly as the previous release made it.

The version-1 tables below are frozen copies of cloud_sync/store/schema.py at schema version 1 (commit
59e289b); a database built from them, holding data, must open under the current code, migrated in place,
with nothing lost and its schema the same as a database created new.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import sqlalchemy as sa

from cloud_sync.errors import SchemaMismatch
from cloud_sync.store import DeviceRegistry, ResultStore, open_database
from cloud_sync.store.schema import SCHEMA_VERSION, schema_version
from tests.cloud_sync.store.conftest import make_batch, make_record
from tests.postgres import postgres_schema_url

V1 = sa.MetaData(
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_N_name)s",
        "uq": "uq_%(table_name)s_%(column_0_N_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    }
)
_RowId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
V1_SCHEMA_VERSION = sa.Table(
    "schema_version",
    V1,
    sa.Column("version", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("applied_at_ms", sa.BigInteger, nullable=False),
)
V1_DEVICES = sa.Table(
    "devices",
    V1,
    sa.Column("device_id", sa.Text, primary_key=True),
    sa.Column("token_sha256", sa.LargeBinary(32), nullable=False, unique=True),
    sa.Column("labels", sa.JSON, nullable=False),
    sa.Column("created_at_ms", sa.BigInteger, nullable=False),
    sa.Column("revoked_at_ms", sa.BigInteger, nullable=True),
)
V1_UPLINK = sa.Table(
    "device_uplink",
    V1,
    sa.Column("device_id", sa.Text, sa.ForeignKey("devices.device_id"), primary_key=True),
    sa.Column("acked_seq", sa.BigInteger, nullable=False),
    sa.Column("max_stored_seq", sa.BigInteger, nullable=False),
    sa.Column("stored_total", sa.BigInteger, nullable=False),
    sa.Column("duplicates_total", sa.BigInteger, nullable=False),
    sa.Column("evicted_total", sa.BigInteger, nullable=False),
    sa.Column("device_produced_total", sa.BigInteger, nullable=False),
    sa.Column("device_evicted_total", sa.BigInteger, nullable=False),
    sa.Column("last_upload_at_ms", sa.BigInteger, nullable=True),
)
V1_RESULTS = sa.Table(
    "results",
    V1,
    sa.Column("id", _RowId, primary_key=True, autoincrement=True),
    sa.Column("device_id", sa.Text, nullable=False),
    sa.Column("seq", sa.BigInteger, nullable=False),
    sa.Column("created_at_ms", sa.BigInteger, nullable=False),
    sa.Column("model", sa.Text, nullable=False),
    sa.Column("version", sa.BigInteger, nullable=False),
    sa.Column("priority", sa.BigInteger, nullable=False),
    sa.Column("kind", sa.SmallInteger, nullable=False),
    sa.Column("payload_type", sa.Text, nullable=False),
    sa.Column("payload", sa.LargeBinary, nullable=False),
    sa.Column("request_id", sa.Text, nullable=False),
    sa.Column("received_at_ms", sa.BigInteger, nullable=False),
    sa.UniqueConstraint("device_id", "seq"),
    sa.Index(None, "device_id", "id"),
)
V1_EVICTIONS = sa.Table(
    "evictions",
    V1,
    sa.Column("id", _RowId, primary_key=True, autoincrement=True),
    sa.Column("device_id", sa.Text, sa.ForeignKey("devices.device_id"), nullable=False),
    sa.Column("from_seq", sa.BigInteger, nullable=False),
    sa.Column("to_seq", sa.BigInteger, nullable=False),
    sa.Column("recorded_at_ms", sa.BigInteger, nullable=False),
    sa.CheckConstraint("from_seq <= to_seq", name="ck_evictions_range"),
    sa.Index(None, "device_id", "from_seq"),
)
# The table names this stream's migration touches (telemetry's are created by create_all, not migrated).
LEDGER_TABLES = ("devices", "device_uplink", "results", "evictions", "quarantine", "schema_version")


def build_v1(url: str) -> None:
    """A version-1 database holding one device that uploaded seqs 1-10 (4-5 evicted), as the old code left it."""
    engine = sa.create_engine(url)
    try:
        if engine.dialect.name == "sqlite":
            # The old code kept its SQLite file in WAL mode as the new one does. Left in rollback-journal
            # mode, replicas opening it together first race to switch the mode, and SQLite answers one of
            # two connections both upgrading a shared lock "database is locked" at once: a failure the
            # deployed file never meets (seen once, under load).
            with engine.connect() as conn:
                conn.exec_driver_sql("PRAGMA journal_mode=WAL")
        with engine.begin() as conn:
            V1.create_all(conn)
            conn.execute(V1_SCHEMA_VERSION.insert().values(version=1, applied_at_ms=1))
            conn.execute(
                V1_DEVICES.insert().values(device_id="cam-old", token_sha256=b"t" * 32, labels={}, created_at_ms=1)
            )
            conn.execute(
                V1_UPLINK.insert().values(
                    device_id="cam-old",
                    acked_seq=10,
                    max_stored_seq=10,
                    stored_total=8,
                    duplicates_total=3,
                    evicted_total=2,
                    device_produced_total=10,
                    device_evicted_total=2,
                    last_upload_at_ms=5,
                )
            )
            conn.execute(
                V1_RESULTS.insert(),
                [
                    {
                        "device_id": "cam-old",
                        "seq": seq,
                        "created_at_ms": 1_700_000_000_000 + seq,
                        "model": "digits",
                        "version": 1,
                        "priority": 100,
                        "kind": 1,
                        "payload_type": "inference.ModelInferResponse",
                        "payload": b"old-%d" % seq,
                        "request_id": f"old-{seq}",
                        "received_at_ms": 2,
                    }
                    for seq in (1, 2, 3, 6, 7, 8, 9, 10)
                ],
            )
            conn.execute(V1_EVICTIONS.insert().values(device_id="cam-old", from_seq=4, to_seq=5, recorded_at_ms=2))
    finally:
        engine.dispose()


@pytest.fixture
def v1_url(store_url: str) -> str:
    build_v1(store_url)
    return store_url


def shape(url: str) -> dict[str, object]:
    """The ledger tables as the database reports them: columns (type, nullable), unique constraints, indexes."""
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            inspector = sa.inspect(conn)
            return {
                table: (
                    sorted((c["name"], str(c["type"]), c["nullable"]) for c in inspector.get_columns(table)),
                    sorted(tuple(u["column_names"]) for u in inspector.get_unique_constraints(table)),
                    sorted(tuple(i["column_names"]) for i in inspector.get_indexes(table)),
                    sorted(
                        (tuple(f["constrained_columns"]), f["referred_table"])
                        for f in inspector.get_foreign_keys(table)
                    ),
                )
                for table in LEDGER_TABLES
            }
    finally:
        engine.dispose()


@pytest.fixture
def fresh_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """Another empty database on the same engine as store_url."""
    if "sqlite" in request.node.callspec.id:
        yield f"sqlite:///{tmp_path / 'fresh.db'}"
        return
    with postgres_schema_url() as url:
        yield url


def test_a_version_1_database_is_migrated_in_place_and_keeps_its_data(v1_url: str) -> None:
    db = open_database(v1_url)
    try:
        versions = db.read(lambda conn: conn.execute(sa.select(schema_version.c.version)).scalars().all())
        assert sorted(versions) == [1, SCHEMA_VERSION]
        store = ResultStore(db)
        r = store.reconcile("cam-old")
        assert (r.acked_seq, r.stored, r.evicted, r.duplicates_total, r.device_produced) == (10, 8, 2, 3, 10)
        assert (r.rejected, r.device_rejected, r.clock_skewed_total, r.max_clock_skew_ms) == (0, 0, 0, 0)
        old = store.results("cam-old")
        assert [row.seq for row in old] == [1, 2, 3, 6, 7, 8, 9, 10]
        assert {row.checksum for row in old} == {None}  # stored before checksums
        assert store.eviction_ranges("cam-old") == [(4, 5)]

        # The device carries on from its watermark, with the new protocol.
        outcome = store.ingest(
            "cam-old",
            make_batch(
                10,
                13,
                records=[make_record(11), make_record(12, kind=0), make_record(13)],
                produced_total=13,
                evicted_total=2,
            ),
        )
        assert (outcome.acked_seq, outcome.stored, outcome.rejected, outcome.rejected_seqs) == (13, 2, 1, (12,))
        r = store.reconcile("cam-old")
        assert r.stored + r.evicted + r.rejected == r.device_produced == 13
        # And a device registered now gets the new columns' defaults.
        DeviceRegistry(db).add_device("cam-new")
        assert store.reconcile("cam-new").rejected == 0
    finally:
        db.close()


def test_a_migrated_database_has_the_schema_of_a_new_one(v1_url: str, fresh_url: str) -> None:
    open_database(v1_url).close()
    open_database(fresh_url).close()
    assert shape(v1_url) == shape(fresh_url)


def test_reopening_a_migrated_database_migrates_nothing_again(v1_url: str) -> None:
    open_database(v1_url).close()
    db = open_database(v1_url, create=False)
    try:
        versions = db.read(lambda conn: conn.execute(sa.select(schema_version.c.version)).scalars().all())
        assert sorted(versions) == [1, SCHEMA_VERSION]
    finally:
        db.close()


def test_replicas_opening_a_version_1_database_together_migrate_it_once(v1_url: str) -> None:
    start = threading.Barrier(3)

    def open_one(_: int) -> int:
        start.wait(10)
        db = open_database(v1_url)
        try:
            return ResultStore(db).reconcile("cam-old").stored
        finally:
            db.close()

    with ThreadPoolExecutor(3) as pool:
        assert list(pool.map(open_one, range(3))) == [8, 8, 8]
    engine = sa.create_engine(v1_url)
    try:
        with engine.connect() as conn:
            assert sorted(conn.execute(sa.select(schema_version.c.version)).scalars()) == [1, SCHEMA_VERSION]
    finally:
        engine.dispose()


def test_a_migration_that_fails_leaves_the_database_at_its_version(v1_url: str) -> None:
    engine = sa.create_engine(v1_url)
    try:
        with engine.begin() as conn:  # something in the way of the migration's new table
            conn.execute(sa.text("CREATE TABLE quarantine (id INTEGER PRIMARY KEY)"))
        with pytest.raises(SchemaMismatch, match="from schema version 1 to 2 failed .*left at version 1"):
            open_database(v1_url)
        with engine.connect() as conn:
            assert conn.execute(sa.select(sa.func.max(schema_version.c.version))).scalar() == 1
            columns = {c["name"] for c in sa.inspect(conn).get_columns("device_uplink")}
            assert "rejected_total" not in columns  # the whole migration rolled back
            assert conn.execute(sa.text("SELECT count(*) FROM results")).scalar() == 8
    finally:
        engine.dispose()
