"""PostgreSQL restarted under a running store: the store recovers by itself, nothing lost or duplicated.

This restarts the machine's shared PostgreSQL server (other tests may be using it), so it is brief and
waits for the server with a deadline. It needs the local cluster's control tool and the right to use it.
"""

from __future__ import annotations

import pytest

from cloud_sync.errors import StoreUnavailable
from cloud_sync.store import DeviceRegistry, IngestOutcome, ResultStore, open_database
from tests.cloud_sync.store.conftest import make_batch
from tests.postgres import local_cluster, restart_postgres

pytestmark = pytest.mark.slow


def test_ingest_recovers_after_postgresql_restarts(postgres_url: str) -> None:
    cluster = local_cluster()
    if cluster is None:
        pytest.skip("needs root and a local PostgreSQL cluster that pg_ctlcluster can restart")
    db = open_database(postgres_url)
    try:
        DeviceRegistry(db).add_device("cam-1")
        store = ResultStore(db)
        assert store.ingest("cam-1", make_batch(0, 100)).acked_seq == 100

        restart_postgres(*cluster)  # every pooled connection is now dead

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
