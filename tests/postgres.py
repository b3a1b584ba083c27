"""The test PostgreSQL server: a schema of its own per test, and (as root) restarting the local cluster.

PostgreSQL comes from $EDGEFLEET_TEST_POSTGRES (a SQLAlchemy URL), by default the local server on
127.0.0.1:5432, database `test`. Tests that need it are skipped, saying why, only when it cannot be reached.

`make test` runs the suite in several processes (pytest-xdist), and two fault tests restart the server under
everyone. So every schema is used under a shared flock on one file, and a restart takes it exclusively: it
waits for the schemas other processes use to be dropped, and no schema is made while it runs. (A process's
own lock is converted, and flock releases it before it waits for the exclusive one, so two restarts never
deadlock.)
"""

from __future__ import annotations

import fcntl
import functools
import os
import shutil
import subprocess
import tempfile
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg
import pytest
import sqlalchemy as sa

from tests.waiting import wait_for

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


class _ServerLock:
    """This process's share of the server: a shared flock while any schema is in use, exclusive to restart."""

    def __init__(self) -> None:
        self._path = Path(tempfile.gettempdir()) / f"edgefleet-tests-postgres-{os.getuid()}.lock"
        self._mutex = threading.Lock()
        self._fd: int | None = None
        self._users = 0

    def _file(self) -> int:
        if self._fd is None:
            self._fd = os.open(self._path, os.O_RDWR | os.O_CREAT, 0o600)
        return self._fd

    @contextmanager
    def shared(self) -> Iterator[None]:
        with self._mutex:
            if self._users == 0:
                fcntl.flock(self._file(), fcntl.LOCK_SH)
            self._users += 1
        try:
            yield
        finally:
            with self._mutex:
                self._users -= 1
                if self._users == 0:
                    fcntl.flock(self._file(), fcntl.LOCK_UN)

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        with self._mutex:
            fcntl.flock(self._file(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(self._file(), fcntl.LOCK_SH if self._users else fcntl.LOCK_UN)


_SERVER = _ServerLock()


@contextmanager
def postgres_schema_url() -> Iterator[str]:
    """A URL whose connections see only a fresh schema of their own; the schema is dropped afterwards."""
    with _SERVER.shared():
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


def local_cluster() -> tuple[str, str] | None:
    """(version, name) of the local cluster serving the test URL, if it can be restarted from here."""
    versions = sorted(Path("/etc/postgresql").glob("*/main")) if Path("/etc/postgresql").is_dir() else []
    host = sa.make_url(POSTGRES_URL).host or "127.0.0.1"
    if not versions or shutil.which("pg_ctlcluster") is None or host not in ("127.0.0.1", "localhost", "::1"):
        return None
    if os.geteuid() != 0:
        return None
    return versions[-1].parent.name, "main"


def accepting() -> bool:
    try:
        with psycopg.connect(POSTGRES_CONNINFO, connect_timeout=2) as conn:
            conn.execute("SELECT 1")
    except psycopg.Error:
        return False
    return True


def restart_postgres(version: str, name: str) -> None:
    """Restart the server once no other test process has a schema on it (see the module's docstring)."""
    with _SERVER.exclusive():
        subprocess.run(
            ["pg_ctlcluster", "--skip-systemctl-redirect", "--mode", "fast", version, name, "restart"],
            check=True,
            timeout=60,
            capture_output=True,
        )
        wait_for(accepting, timeout=60, what="PostgreSQL to accept connections after its restart", poll=0.1)
