"""The device's outbox: results kept in SQLite (WAL) until the cloud acknowledges them.

Not the uploader (which streams batches to cloud-sync) nor its protocol; DESIGN.md "Data plane" decides both.
"""

from edge_runtime.outbox._outbox import Outbox
from edge_runtime.outbox._schema import SCHEMA_VERSION
from edge_runtime.outbox._types import OutboxCounters, OutboxRecord, OutboxUnusable, Payload, UploadBatch

__all__ = ["SCHEMA_VERSION", "Outbox", "OutboxCounters", "OutboxRecord", "OutboxUnusable", "Payload", "UploadBatch"]
