"""The cloud store: device registry and result ingest over SQLAlchemy Core, on SQLite or PostgreSQL.

    db = open_database("sqlite:////var/lib/cloud-sync/cloud.db")   # or postgresql+psycopg://...
    token = DeviceRegistry(db).add_device("cam-17", {"site": "lyon"})
    ack = ResultStore(db).ingest("cam-17", batch)                   # commits before it returns

Everything here is synchronous and thread-safe; async callers run it in a thread pool.
"""

from __future__ import annotations

from cloud_sync.registry import store as _registry_store  # noqa: F401  (model_versions on the metadata)
from cloud_sync.rollouts import store as _rollouts_store  # noqa: F401  (rollouts, rollout_events on the metadata)

# control and telemetry are imported here also so that their tables are on the schema's metadata before
# open_database creates the schema.
from cloud_sync.store import assignments as _assignments  # noqa: F401  (model_assignments on the metadata)
from cloud_sync.store.audit import AuditLog
from cloud_sync.store.batches import IngestLimits
from cloud_sync.store.control import ControlStore
from cloud_sync.store.database import Database, open_database
from cloud_sync.store.devices import Device, DeviceRegistry
from cloud_sync.store.enrollment import EnrollmentTokens  # noqa: F401  (its table on the metadata)
from cloud_sync.store.policies import PolicyStore
from cloud_sync.store.results import IngestOutcome, QuarantineEntry, Reconciliation, ResultStore, StoredResult
from cloud_sync.store.telemetry import TelemetryStore
from cloud_sync.store.tokens import ApiTokens

__all__ = [
    "ApiTokens",
    "AuditLog",
    "ControlStore",
    "Database",
    "Device",
    "DeviceRegistry",
    "IngestLimits",
    "IngestOutcome",
    "PolicyStore",
    "QuarantineEntry",
    "Reconciliation",
    "ResultStore",
    "StoredResult",
    "TelemetryStore",
    "open_database",
]
