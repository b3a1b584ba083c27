"""The cloud store's tables: one SQLAlchemy Core schema that both SQLite and PostgreSQL run unchanged.

Times are integer milliseconds since the Unix epoch (as `created_at_ms` in the protos), so both engines store
and compare them the same way. This module only declares; database.py creates and checks.
"""

from __future__ import annotations

import sqlalchemy as sa

__all__ = [
    "SCHEMA_VERSION",
    "device_uplink",
    "devices",
    "evictions",
    "metadata",
    "quarantine",
    "results",
    "schema_version",
]

# Bump with a migration in migrations.py whenever a table below changes.
SCHEMA_VERSION = 2

metadata = sa.MetaData(
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_N_name)s",
        "uq": "uq_%(table_name)s_%(column_0_N_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    }
)

# A 64-bit id on PostgreSQL; on SQLite only "INTEGER PRIMARY KEY" aliases the rowid (a BIGINT key would not).
_RowId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")

schema_version = sa.Table(
    "schema_version",
    metadata,
    sa.Column("version", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("applied_at_ms", sa.BigInteger, nullable=False),
)

devices = sa.Table(
    "devices",
    metadata,
    sa.Column("device_id", sa.Text, primary_key=True),
    # sha256 of the device token; the token itself is shown once by add_device and never stored.
    sa.Column("token_sha256", sa.LargeBinary(32), nullable=False, unique=True),
    sa.Column("labels", sa.JSON, nullable=False),
    sa.Column("created_at_ms", sa.BigInteger, nullable=False),
    sa.Column("revoked_at_ms", sa.BigInteger, nullable=True),
)

# One row per device, created with the device: the upload watermark and the reconciliation counters.
# Ingest locks this row (SELECT ... FOR UPDATE on PostgreSQL), which serialises a device's batches.
device_uplink = sa.Table(
    "device_uplink",
    metadata,
    sa.Column("device_id", sa.Text, sa.ForeignKey("devices.device_id"), primary_key=True),
    # Every seq <= acked_seq is stored or was declared evicted by the device.
    sa.Column("acked_seq", sa.BigInteger, nullable=False),
    # The highest seq stored; above acked_seq only when a batch arrived past a gap.
    sa.Column("max_stored_seq", sa.BigInteger, nullable=False),
    sa.Column("stored_total", sa.BigInteger, nullable=False),
    sa.Column("duplicates_total", sa.BigInteger, nullable=False),
    # Seqs the cloud recorded as evicted (declared by the device, counted here).
    sa.Column("evicted_total", sa.BigInteger, nullable=False),
    # The device's own counters, as last reported in a batch.
    sa.Column("device_produced_total", sa.BigInteger, nullable=False),
    sa.Column("device_evicted_total", sa.BigInteger, nullable=False),
    sa.Column("last_upload_at_ms", sa.BigInteger, nullable=True),
    # Since schema version 2. Seqs in the quarantine: rejected here, or declared rejected by the device.
    sa.Column("rejected_total", sa.BigInteger, nullable=False, server_default="0"),
    # Of those, the ones the device declared (bounded by the device's own rejected_total).
    sa.Column("rejected_on_device_total", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("device_rejected_total", sa.BigInteger, nullable=False, server_default="0"),
    # Stored records stamped more than IngestLimits.clock_skew_tolerance_ms ahead of the cloud's clock, and
    # the largest such skew: a device whose clock runs fast.
    sa.Column("clock_skewed_total", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("max_clock_skew_ms", sa.BigInteger, nullable=False, server_default="0"),
)

results = sa.Table(
    "results",
    metadata,
    # The operators' cursor (fleetctl results tail): assigned at insert, increasing. SQLite assigns max(id) + 1
    # (AUTOINCREMENT would cost ~3 us a row, a third of the insert): ids stay unique while the newest row is kept.
    sa.Column("id", _RowId, primary_key=True, autoincrement=True),
    sa.Column("device_id", sa.Text, nullable=False),
    sa.Column("seq", sa.BigInteger, nullable=False),
    sa.Column("created_at_ms", sa.BigInteger, nullable=False),
    sa.Column("model", sa.Text, nullable=False),
    # uint32 in the proto: past PostgreSQL's signed INTEGER.
    sa.Column("version", sa.BigInteger, nullable=False),
    sa.Column("priority", sa.BigInteger, nullable=False),
    sa.Column("kind", sa.SmallInteger, nullable=False),
    sa.Column("payload_type", sa.Text, nullable=False),
    sa.Column("payload", sa.LargeBinary, nullable=False),
    sa.Column("request_id", sa.Text, nullable=False),
    sa.Column("received_at_ms", sa.BigInteger, nullable=False),
    # RECORD_CHECKSUM_CRC32 of the stored values, checked at ingest; NULL from agents that send none (and for
    # rows stored before schema version 2).
    sa.Column("checksum", sa.BigInteger, nullable=True),
    # The idempotency key of the upload protocol.
    sa.UniqueConstraint("device_id", "seq"),
    # `results(device_id=..., after_id=...)` for one device without scanning the others.
    sa.Index(None, "device_id", "id"),
)

# Ranges of seqs the device declared evicted and the cloud counted, kept for audit.
evictions = sa.Table(
    "evictions",
    metadata,
    sa.Column("id", _RowId, primary_key=True, autoincrement=True),
    sa.Column("device_id", sa.Text, sa.ForeignKey("devices.device_id"), nullable=False),
    sa.Column("from_seq", sa.BigInteger, nullable=False),
    sa.Column("to_seq", sa.BigInteger, nullable=False),
    sa.Column("recorded_at_ms", sa.BigInteger, nullable=False),
    sa.CheckConstraint("from_seq <= to_seq", name="ck_evictions_range"),
    sa.Index(None, "device_id", "from_seq"),
)

# Records the cloud will never store as results, one row per (device, seq), kept for the operator: those that
# failed here (a bounded copy of the record beside the reason) and those the device declared it quarantined.
# Each counts as rejected in device_uplink; its seq is acknowledged like a stored one.
quarantine = sa.Table(
    "quarantine",
    metadata,
    sa.Column("id", _RowId, primary_key=True, autoincrement=True),
    sa.Column("device_id", sa.Text, sa.ForeignKey("devices.device_id"), nullable=False),
    sa.Column("seq", sa.BigInteger, nullable=False),
    sa.Column("reason", sa.Text, nullable=False),
    # "cloud" or "device".
    sa.Column("source", sa.Text, nullable=False),
    # The device's timestamp, as reported (NULL for a declared rejection: the cloud never saw the record).
    sa.Column("created_at_ms", sa.BigInteger, nullable=True),
    sa.Column("received_at_ms", sa.BigInteger, nullable=False),
    # The first IngestLimits.max_quarantined_bytes of the serialized ResultRecord, and its full size.
    sa.Column("record", sa.LargeBinary, nullable=True),
    sa.Column("record_size", sa.BigInteger, nullable=False),
    sa.UniqueConstraint("device_id", "seq"),
)
