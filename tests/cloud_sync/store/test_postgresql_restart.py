"""PostgreSQL restarted under a running store: the store recovers by itself, nothing lost or duplicated.

This restarts the machine's shared PostgreSQL server (other tests may be using it), so it is brief and
waits for the server with a deadline. It needs the local cluster's control tool and the right to use it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import psycopg
import pytest
import sqlalchemy as sa

from cloud_sync.errors import StoreUnavailable
from cloud_sync.store import DeviceRegistry, IngestOutcome, ResultStore, open_database
from tests.cloud_sync.store.conftest import POSTGRES_CONNINFO, POSTGRES_URL, make_batch
from tests.waiting import wait_for

pytestmark = pytest.mark.slow


def _local_cluster() -> tuple[str, str] | None:
    """(version, name) of the local cluster serving the test URL, if it can be restarted from here."""
    versions = sorted(Path("/etc/postgresql").glob("*/main")) if Path("/etc/postgresql").is_dir() else []
    host = sa.make_url(POSTGRES_URL).host or "127.0.0.1"
    if not versions or shutil.which("pg_ctlcluster") is None or host not in ("127.0.0.1", "localhost", "::1"):
        return None
    if os.geteuid() != 0:
        return None
    return versions[-1].parent.name, "main"


def _accepting() -> bool:
    try:
        with psycopg.connect(POSTGRES_CONNINFO, connect_timeout=2) as conn:
            conn.execute("SELECT 1")
    except psycopg.Error:
        return False
    return True


def _restart(version: str, name: str) -> None:
    subprocess.run(
        ["pg_ctlcluster", "--skip-systemctl-redirect", "--mode", "fast", version, name, "restart"],
        check=True,
        timeout=60,
        capture_output=True,
    )
    wait_for(_accepting, timeout=60, what="PostgreSQL to accept connections after its restart", poll=0.1)


def test_ingest_recovers_after_postgresql_restarts(postgres_url: str) -> None:
    cluster = _local_cluster()
    if cluster is None:
        pytest.skip("needs root and a local PostgreSQL cluster that pg_ctlcluster can restart")
    db = open_database(postgres_url)
    try:
        DeviceRegistry(db).add_device("cam-1")
        store = ResultStore(db)
        assert store.ingest("cam-1", make_batch(0, 100)).acked_seq == 100

        _restart(*cluster)  # every pooled connection is now dead

        # The next upload succeeds (the pool finds the dead connections and reconnects, or the transaction is
        # retried once), or it fails with StoreUnavailable and the device sends the same batch again.
        try:
            outcome = store.ingest("cam-1", make_batch(100, 200))
        except StoreUnavailable as exc:
            assert "check that PostgreSQL is running" in str(exc)
            outcome = store.ingest("cam-1", make_batch(100, 200))
        assert outcome.acked_seq == 200
        assert store.ingest("cam-1", make_batch(200, 300)) == IngestOutcome(300, 100, 0, 0)

        assert store.seqs("cam-1") == list(range(1, 301))
        reconciliation = store.reconcile("cam-1")
        assert (reconciliation.stored, reconciliation.acked_seq, reconciliation.evicted) == (300, 300, 0)
    finally:
        db.close()
