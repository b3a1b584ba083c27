"""Open the cloud store from a URL (SQLite file or PostgreSQL), create its schema, run transactions.

Every transaction goes through `Database.read` or `Database.write`, which turn driver errors into
`StoreUnavailable` and retry once when the connection was lost (a PostgreSQL restart). Not an ORM session.
A database at an older schema version is migrated in place when opened (migrations.py).
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable
from typing import Any, Literal, TypeVar

import sqlalchemy as sa
import structlog
from sqlalchemy import event
from sqlalchemy import exc as sa_exc

from cloud_sync.errors import InvalidArgument, SchemaMismatch, StoreUnavailable
from cloud_sync.store.group_commit import GroupCommit, PendingWrite
from cloud_sync.store.migrations import MIGRATIONS, migrate
from cloud_sync.store.schema import SCHEMA_VERSION, metadata, schema_version

__all__ = ["Database", "open_database"]

T = TypeVar("T")
Backend = Literal["sqlite", "postgresql"]

log = structlog.get_logger(__name__)

_BEGIN_OPTION = "cloud_sync_sqlite_begin"
# Any constant will do: replicas starting together take it so only one of them creates the tables.
_SCHEMA_LOCK_KEY = 0x6566_7363_6865_6D61  # "efschema"


class Database:
    """An open store: a SQLAlchemy engine plus the transaction discipline every store module uses.

    Thread-safe; share one per process. The callables given to `read` and `write` may run twice (after a
    lost connection) and beside other writes in one transaction (SQLite group commit), so they must only
    talk to the database through the connection they are given and have no other side effects.
    """

    def __init__(self, engine: sa.Engine, backend: Backend) -> None:
        self.engine = engine
        self.backend: Backend = backend
        # SQLite has one writer and pays a WAL fsync per commit: writes from this process's threads share
        # transactions instead of queueing on the file lock. Other processes still wait on it (busy_timeout).
        self._group = GroupCommit[sa.Connection](self._execute_group) if backend == "sqlite" else None

    @property
    def url(self) -> str:
        """The database URL, with any password hidden."""
        return self.engine.url.render_as_string(hide_password=True)

    def read(self, fn: Callable[[sa.Connection], T]) -> T:
        """Run `fn(connection)` in a read transaction and return its result."""
        return self._run(fn)

    def write(self, fn: Callable[[sa.Connection], T]) -> T:
        """Run `fn(connection)` in a write transaction, commit, and return its result.

        The commit has happened when this returns; if `fn` raises, none of its changes are kept. On SQLite
        the transaction holds the write lock from its start (BEGIN IMMEDIATE), and `fn` runs in a savepoint
        of a transaction it may share with writes from other threads (one fsync for all of them). On
        PostgreSQL each call is its own transaction and `fn` takes the row locks it needs.
        """
        if self._group is not None:
            return self._group.submit(fn)
        return self._run(fn)

    def close(self) -> None:
        """Close every pooled connection; the Database must not be used afterwards."""
        self.engine.dispose()

    def _run(self, fn: Callable[[sa.Connection], T]) -> T:
        for attempt in (1, 2):
            try:
                with self.engine.begin() as conn:
                    return fn(conn)
            except (sa_exc.DBAPIError, sa_exc.TimeoutError) as exc:
                # SQLAlchemy marks errors that mean "this connection is gone" (server restart, network cut)
                # and invalidates the pool; one retry then runs on a fresh connection.
                if isinstance(exc, sa_exc.DBAPIError) and exc.connection_invalidated and attempt == 1:
                    log.warning("store.retry_after_disconnect", backend=self.backend, error=_first_line(exc.orig))
                    continue
                translated = self._translate(exc)
                if translated is exc:
                    raise
                raise translated from exc
        raise AssertionError("unreachable")  # pragma: no cover

    def _execute_group(self, group: list[PendingWrite[sa.Connection]]) -> None:
        try:
            with self.engine.connect() as conn:
                conn = conn.execution_options(**{_BEGIN_OPTION: "IMMEDIATE"})
                with conn.begin():
                    for write in group:
                        try:
                            with conn.begin_nested():  # a write that raises leaves no trace
                                write.run(conn)
                        except sa_exc.DBAPIError as exc:
                            write.fail(self._translate(exc))
                            if isinstance(write.error, StoreUnavailable):
                                raise  # the shared transaction itself may be gone: end the group
                            # else a statement the database refused (a constraint): its savepoint undid it
                        except Exception as exc:
                            write.fail(exc)
        except Exception as exc:
            for write in group:
                if write.error is None:  # writes that refused on their own keep their own error
                    write.fail(self._group_failed(exc))

    def _translate(self, exc: Exception) -> Exception:
        """The error a caller sees for a driver error: a new StoreUnavailable (caused by `exc`) when retrying
        later can help, else `exc` itself (a bug, such as a statement the database refuses)."""
        if isinstance(exc, sa_exc.TimeoutError):
            message = (
                f"no free connection to database {self.url} within the pool timeout: "
                "the store is overloaded; retry later or raise the pool size"
            )
        elif isinstance(exc, sa_exc.DBAPIError) and (
            exc.connection_invalidated or isinstance(exc, (sa_exc.OperationalError, sa_exc.InterfaceError))
        ):
            if self.backend == "postgresql":
                advice = "check that PostgreSQL is running and reachable; the call can be retried"
            else:
                advice = (
                    "check the database file, its directory and free disk space, and that no other process holds "
                    "its write lock; the call can be retried"
                )
            message = f"database {self.url} is unavailable ({_first_line(exc.orig)}): {advice}"
        else:
            return exc
        unavailable = StoreUnavailable(message)
        unavailable.__cause__ = exc
        return unavailable

    def _group_failed(self, exc: Exception) -> Exception:
        """The error for each write of a group whose shared transaction failed (a new one for each caller)."""
        translated = self._translate(exc)
        if translated is exc:
            translated = StoreUnavailable(
                f"database {self.url}: the transaction this write shared with others failed "
                f"({type(exc).__name__}); the call can be retried"
            )
            translated.__cause__ = exc
        return translated


def open_database(url: str, *, create: bool = True, pool_size: int = 5, busy_timeout_ms: int = 10_000) -> Database:
    """Open the store at `url` and make sure its schema is there and current.

    `url` is `sqlite:///relative/path.db`, `sqlite:////absolute/path.db` (the default, embedded engine) or
    `postgresql+psycopg://user:password@host:port/dbname` (`postgresql://` means the same). With
    `create=False` a missing schema is an error instead of being created.
    """
    try:
        parsed = sa.make_url(url)
    except sa_exc.ArgumentError as exc:
        raise InvalidArgument(f"not a database URL: {url!r}") from exc
    backend: Backend
    if parsed.get_backend_name() == "sqlite":
        backend, engine = "sqlite", _sqlite_engine(parsed, busy_timeout_ms)
    elif parsed.get_backend_name() == "postgresql":
        backend, engine = "postgresql", _postgresql_engine(parsed, pool_size)
    else:
        raise InvalidArgument(
            f"unsupported database {parsed.get_backend_name()!r}: use a sqlite:/// or postgresql+psycopg:// URL"
        )
    db = Database(engine, backend)
    try:
        db.write(lambda conn: _ensure_schema(conn, backend, create=create))
    except BaseException:
        db.close()
        raise
    return db


def _sqlite_engine(url: sa.URL, busy_timeout_ms: int) -> sa.Engine:
    if url.database in (None, "", ":memory:") or (url.database or "").startswith("file::memory:"):
        raise InvalidArgument("in-memory SQLite is not supported (each connection would see its own): use a file")
    engine = sa.create_engine(url)

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: sqlite3.Connection, _record: Any) -> None:
        # We emit BEGIN ourselves (below); the sqlite3 module's implicit transactions would interfere.
        dbapi_conn.isolation_level = None
        cursor = dbapi_conn.cursor()
        # FULL: a commit survives power loss, not only a crash; ingest acks only what is committed.
        for pragma in ("journal_mode=WAL", "synchronous=FULL", "foreign_keys=ON", f"busy_timeout={busy_timeout_ms}"):
            cursor.execute(f"PRAGMA {pragma}")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: sa.Connection) -> None:
        conn.exec_driver_sql(f"BEGIN {conn.get_execution_options().get(_BEGIN_OPTION, 'DEFERRED')}")

    return engine


def _postgresql_engine(url: sa.URL, pool_size: int) -> sa.Engine:
    if url.drivername in ("postgresql", "postgres"):
        url = url.set(drivername="postgresql+psycopg")
    elif url.drivername != "postgresql+psycopg":
        raise InvalidArgument(f"unsupported PostgreSQL driver {url.drivername!r}: use postgresql+psycopg://")
    return sa.create_engine(
        url,
        # Finds connections a server restart killed before a transaction uses them.
        pool_pre_ping=True,
        pool_size=pool_size,
        max_overflow=pool_size,
        pool_timeout=10,
        connect_args={"connect_timeout": 5, "application_name": "cloud-sync"},
    )


def _ensure_schema(conn: sa.Connection, backend: Backend, *, create: bool) -> None:
    if backend == "postgresql":
        conn.execute(sa.select(sa.func.pg_advisory_xact_lock(_SCHEMA_LOCK_KEY)))
    inspector = sa.inspect(conn)
    if not inspector.has_table(schema_version.name):
        if not create:
            raise SchemaMismatch("the database has no cloud-sync schema: open it with create=True to create it")
        metadata.create_all(conn)
        conn.execute(schema_version.insert().values(version=SCHEMA_VERSION, applied_at_ms=now_ms()))
        return
    found = conn.execute(sa.select(sa.func.max(schema_version.c.version))).scalar_one_or_none()
    if found is None or found > SCHEMA_VERSION or (found < SCHEMA_VERSION and found not in MIGRATIONS):
        raise SchemaMismatch(
            f"the database is at schema version {found}, this cloud-sync uses {SCHEMA_VERSION}: "
            "run the cloud-sync release that matches it (a newer database cannot be migrated back)"
        )
    if found < SCHEMA_VERSION:
        # Under the lock taken above (SQLite: this transaction's write lock), so one replica migrates.
        try:
            migrate(conn, found, now_ms())
        except (sa_exc.ProgrammingError, sa_exc.IntegrityError, sa_exc.OperationalError) as exc:
            if exc.connection_invalidated:
                raise
            raise SchemaMismatch(
                f"migrating the database from schema version {found} to {SCHEMA_VERSION} failed "
                f"({_first_line(exc.orig)}); it was left at version {found}"
            ) from exc
    # Tables declared on `metadata` by a store module imported after the database was first created (the
    # telemetry tables) are created now; existing tables are left as they are.
    metadata.create_all(conn)


def now_ms() -> int:
    """Wall-clock time in integer milliseconds since the epoch (what the store records times in)."""
    return time.time_ns() // 1_000_000


def _first_line(exc: BaseException | None) -> str:
    text = str(exc).strip() if exc is not None else ""
    return text.splitlines()[0] if text else type(exc).__name__
