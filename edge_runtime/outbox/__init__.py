"""The device's outbox: results kept in SQLite (WAL) until the cloud acknowledges them.

Not the uploader (which streams batches to cloud-sync) nor its protocol; DESIGN.md "Data plane" decides both.
"""

from edge_runtime.outbox._outbox import Outbox
from edge_runtime.outbox._record import MAX_RECORD_PAYLOAD_BYTES
from edge_runtime.outbox._schema import SCHEMA_VERSION
from edge_runtime.outbox._types import (
    DeferredPayload,
    OutboxCounters,
    OutboxRecord,
    OutboxUnusable,
    Payload,
    QuarantineEntry,
    UploadBatch,
)

__all__ = [
    "MAX_RECORD_PAYLOAD_BYTES",
    "SCHEMA_VERSION",
    "DeferredPayload",
    "Outbox",
    "OutboxCounters",
    "OutboxRecord",
    "OutboxUnusable",
    "Payload",
    "QuarantineEntry",
    "UploadBatch",
]
