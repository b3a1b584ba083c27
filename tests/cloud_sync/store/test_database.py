"""Opening the store: URLs, schema creation and version, SQLite settings, transactions, driver errors."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import sqlalchemy as sa

from cloud_sync.errors import InvalidArgument, NotFound, SchemaMismatch, StoreUnavailable
from cloud_sync.store import Database, open_database
from cloud_sync.store.schema import SCHEMA_VERSION, devices, metadata, schema_version

NOTE = sa.Table("note", sa.MetaData(), sa.Column("value", sa.Integer, primary_key=True))


def test_open_creates_every_table_and_records_the_schema_version(db: Database) -> None:
    names = db.read(lambda conn: set(sa.inspect(conn).get_table_names()))
    assert set(metadata.tables) <= names
    versions = db.read(lambda conn: conn.execute(sa.select(schema_version.c.version)).scalars().all())
    assert versions == [SCHEMA_VERSION]


def test_reopening_keeps_the_data(store_url: str) -> None:
    first = open_database(store_url)
    first.write(
        lambda conn: conn.execute(
            devices.insert().values(device_id="cam-1", token_sha256=b"h" * 32, labels={}, created_at_ms=1)
        )
    )
    first.close()
    again = open_database(store_url, create=False)
    try:
        count = again.read(lambda conn: conn.execute(sa.select(sa.func.count()).select_from(devices)).scalar())
        assert count == 1
    finally:
        again.close()


def test_a_newer_schema_version_is_refused(store_url: str) -> None:
    db = open_database(store_url)
    db.write(lambda conn: conn.execute(schema_version.insert().values(version=SCHEMA_VERSION + 1, applied_at_ms=1)))
    db.close()
    with pytest.raises(SchemaMismatch, match=f"schema version {SCHEMA_VERSION + 1}, this cloud-sync uses"):
        open_database(store_url)


def test_create_false_refuses_an_empty_database(store_url: str) -> None:
    with pytest.raises(SchemaMismatch, match="no cloud-sync schema"):
        open_database(store_url, create=False)


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("not a url", "not a database URL"),
        ("mysql://localhost/x", "unsupported database 'mysql'"),
        ("postgresql+psycopg2://localhost/x", "unsupported PostgreSQL driver"),
        ("sqlite://", "in-memory SQLite is not supported"),
        ("sqlite:///:memory:", "in-memory SQLite is not supported"),
    ],
)
def test_bad_urls_are_refused(url: str, reason: str) -> None:
    with pytest.raises(InvalidArgument, match=reason):
        open_database(url)


def test_sqlite_connections_are_durable_and_checked(tmp_path: Path) -> None:
    db = open_database(f"sqlite:///{tmp_path / 'cloud.db'}", busy_timeout_ms=4321)
    try:
        pragmas = db.read(
            lambda conn: {
                name: conn.exec_driver_sql(f"PRAGMA {name}").scalar()
                for name in ("journal_mode", "synchronous", "foreign_keys", "busy_timeout")
            }
        )
    finally:
        db.close()
    # synchronous 2 = FULL: a commit survives power loss, not only a crash.
    assert pragmas == {"journal_mode": "wal", "synchronous": 2, "foreign_keys": 1, "busy_timeout": 4321}


def test_sqlite_in_a_missing_directory_is_unavailable_and_says_what_to_check(tmp_path: Path) -> None:
    with pytest.raises(StoreUnavailable, match="unable to open database file.*check the database file"):
        open_database(f"sqlite:///{tmp_path / 'absent' / 'cloud.db'}")


def test_an_unreachable_postgresql_is_unavailable_and_says_what_to_do() -> None:
    # Port 1 on loopback: nothing listens, the connection is refused at once.
    with pytest.raises(StoreUnavailable, match="check that PostgreSQL is running and reachable") as caught:
        open_database("postgresql+psycopg://cloud:s3cret@127.0.0.1:1/fleet")
    assert "s3cret" not in str(caught.value)


def test_a_write_that_raises_leaves_nothing(db: Database) -> None:
    db.write(lambda conn: NOTE.create(conn))

    def insert_then_fail(conn: sa.Connection) -> None:
        conn.execute(NOTE.insert().values(value=1))
        raise NotFound("changed my mind")

    with pytest.raises(NotFound, match="changed my mind"):
        db.write(insert_then_fail)
    assert db.read(lambda conn: conn.execute(sa.select(NOTE)).all()) == []


def test_concurrent_writes_keep_their_own_outcome(db: Database) -> None:
    """On SQLite these share transactions (group commit): a write that fails must not take others with it."""
    db.write(lambda conn: NOTE.create(conn))
    start = threading.Barrier(8)

    def write(value: int) -> int:
        def run(conn: sa.Connection) -> int:
            conn.execute(NOTE.insert().values(value=value))
            if value % 4 == 0:
                raise NotFound(f"refused {value}")
            return value

        if value < 8:
            start.wait(10)
        return db.write(run)

    with ThreadPoolExecutor(8) as pool:
        futures = {value: pool.submit(write, value) for value in range(200)}
    for value, future in futures.items():
        if value % 4 == 0:
            with pytest.raises(NotFound, match=f"refused {value}$"):
                future.result()
        else:
            assert future.result() == value
    stored = db.read(lambda conn: conn.execute(sa.select(NOTE.c.value).order_by(NOTE.c.value)).scalars().all())
    assert stored == [value for value in range(200) if value % 4]


def test_a_database_error_inside_a_write_is_not_swallowed(db: Database) -> None:
    db.write(lambda conn: NOTE.create(conn))
    db.write(lambda conn: conn.execute(NOTE.insert().values(value=1)))
    with pytest.raises(sa.exc.IntegrityError):
        db.write(lambda conn: conn.execute(NOTE.insert().values(value=1)))
    # The store still works afterwards.
    db.write(lambda conn: conn.execute(NOTE.insert().values(value=2)))
    assert db.read(lambda conn: conn.execute(sa.select(sa.func.count()).select_from(NOTE)).scalar()) == 2


def test_a_connection_killed_inside_a_transaction_is_retried_once(postgres_url: str) -> None:
    """The server ends this transaction's backend (as a restart would): the write runs again, on a new one."""
    db = open_database(postgres_url)
    try:
        db.write(lambda conn: NOTE.create(conn))
        calls = []

        def write(conn: sa.Connection) -> None:
            calls.append(1)
            conn.execute(NOTE.insert().values(value=len(calls)))
            if len(calls) == 1:
                conn.execute(sa.text("SELECT pg_terminate_backend(pg_backend_pid())"))

        db.write(write)

        assert len(calls) == 2
        assert db.read(lambda conn: conn.execute(sa.select(NOTE.c.value)).scalars().all()) == [2]
    finally:
        db.close()


def test_a_connection_killed_twice_is_unavailable(postgres_url: str) -> None:
    db = open_database(postgres_url)
    try:
        with pytest.raises(StoreUnavailable, match="is unavailable .*the call can be retried"):
            db.write(lambda conn: conn.execute(sa.text("SELECT pg_terminate_backend(pg_backend_pid())")))
        assert db.read(lambda conn: conn.execute(sa.text("SELECT 1")).scalar()) == 1
    finally:
        db.close()
