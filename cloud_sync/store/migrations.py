"""Schema migrations: each takes a database from one schema version to the next, in place.

database.py runs them inside the transaction that checks the schema, under the lock that serialises replicas
starting together (PostgreSQL's advisory lock; SQLite's write lock), so one replica migrates and the others
find the new version. SQLite and PostgreSQL both run DDL inside a transaction: a migration that fails leaves
the database at its old version. The DDL of each step is frozen here, as that version had it: schema.py
describes only the newest.
"""

from __future__ import annotations

from collections.abc import Callable

import sqlalchemy as sa
import structlog

from cloud_sync.store.schema import SCHEMA_VERSION, metadata, schema_version

__all__ = ["MIGRATIONS", "migrate"]

log = structlog.get_logger(__name__)

Migration = Callable[[sa.Connection], None]


def _v2(conn: sa.Connection) -> None:
    """Ledger v2: record checksums, per-record quarantine, rejected and clock-skew counters."""
    conn.exec_driver_sql("ALTER TABLE results ADD COLUMN checksum BIGINT")
    for column in (
        "rejected_total",
        "rejected_on_device_total",
        "device_rejected_total",
        "clock_skewed_total",
        "max_clock_skew_ms",
    ):
        conn.exec_driver_sql(f"ALTER TABLE device_uplink ADD COLUMN {column} BIGINT NOT NULL DEFAULT 0")
    frozen = sa.MetaData(naming_convention=metadata.naming_convention)
    row_id = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
    sa.Table("devices", frozen, sa.Column("device_id", sa.Text, primary_key=True))  # for the foreign key only
    quarantine = sa.Table(
        "quarantine",
        frozen,
        sa.Column("id", row_id, primary_key=True, autoincrement=True),
        sa.Column("device_id", sa.Text, sa.ForeignKey("devices.device_id"), nullable=False),
        sa.Column("seq", sa.BigInteger, nullable=False),
        sa.Column("reason", sa.Text, nullable=False),
        sa.Column("source", sa.Text, nullable=False),
        sa.Column("created_at_ms", sa.BigInteger, nullable=True),
        sa.Column("received_at_ms", sa.BigInteger, nullable=False),
        sa.Column("record", sa.LargeBinary, nullable=True),
        sa.Column("record_size", sa.BigInteger, nullable=False),
        sa.UniqueConstraint("device_id", "seq"),
    )
    quarantine.create(conn)


# MIGRATIONS[v] takes a database from schema version v to v + 1.
MIGRATIONS: dict[int, Migration] = {1: _v2}


def migrate(conn: sa.Connection, found: int, applied_at_ms: int) -> None:
    """Bring a database at schema version `found` to SCHEMA_VERSION, recording each version reached."""
    for version in range(found, SCHEMA_VERSION):
        step = MIGRATIONS.get(version)
        if step is None:  # pragma: no cover - a release that bumped the version without a migration
            raise AssertionError(f"no migration from schema version {version}")
        step(conn)
        conn.execute(schema_version.insert().values(version=version + 1, applied_at_ms=applied_at_ms))
    log.info("store.migrated", from_version=found, to_version=SCHEMA_VERSION)
