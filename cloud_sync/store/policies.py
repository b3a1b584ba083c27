"""The policies table: fleet-wide scaling policies, versioned, each with a label selector and a priority.

Validation is cloud_sync/policies.py's (run before any transaction); which policies a device gets is
`effective_policy` there, and delivering it is the desired state's job. This module only stores.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import sqlalchemy as sa
from sqlalchemy import exc as sa_exc

from cloud_sync.errors import NotFound, StoreUnavailable
from cloud_sync.policies import Policy, check_document, check_policy_name, check_priority
from cloud_sync.selectors import check_selector
from cloud_sync.store.database import Database, now_ms
from cloud_sync.store.schema import metadata

__all__ = ["PolicyStore", "policies"]

# A brand-new table: open_database's create_all (checkfirst) makes it after the migrations, no migration needed.
policies = sa.Table(
    "policies",
    metadata,
    sa.Column("name", sa.Text, primary_key=True),
    sa.Column("version", sa.BigInteger, nullable=False),
    sa.Column("selector", sa.JSON, nullable=False),
    sa.Column("priority", sa.Integer, nullable=False),
    sa.Column("document", sa.JSON, nullable=False),
    sa.Column("created_at_ms", sa.BigInteger, nullable=False),
    sa.Column("updated_at_ms", sa.BigInteger, nullable=False),
)


class _CreatedMeanwhile(Exception):
    """Another writer created the same policy between our read and our insert (PostgreSQL): try again."""


def _policy(row: Any) -> Policy:
    return Policy(row.name, row.version, dict(row.selector), row.priority, dict(row.document), row.updated_at_ms)


class PolicyStore:
    """Policies by name. Thread-safe; every method validates its input before it touches the database."""

    def __init__(self, db: Database) -> None:
        self._db = db

    def set(self, name: str, selector: Mapping[str, str], priority: int, document: Mapping[str, Any]) -> Policy:
        """Create or replace the policy `name`; its version is 1 when created and grows by one on every change.

        Setting exactly what is stored changes nothing (same version). PolicyInvalid (an InvalidArgument)
        names the field of a bad input; nothing is written then.
        """
        check_policy_name(name)
        checked_selector = check_selector(selector)
        check_priority(priority)
        checked = check_document(document)

        def put(conn: sa.Connection) -> Policy:
            row = conn.execute(sa.select(policies).where(policies.c.name == name).with_for_update()).one_or_none()
            at = now_ms()
            if row is None:
                values = dict(name=name, version=1, selector=checked_selector, priority=priority, document=checked)
                try:
                    with conn.begin_nested():
                        conn.execute(policies.insert().values(**values, created_at_ms=at, updated_at_ms=at))
                except sa_exc.IntegrityError as exc:
                    raise _CreatedMeanwhile() from exc
                return Policy(name, 1, checked_selector, priority, checked, at)
            current = _policy(row)
            if (current.selector, current.priority, current.document) == (checked_selector, priority, checked):
                return current
            conn.execute(
                policies.update()
                .where(policies.c.name == name)
                .values(
                    version=row.version + 1,
                    selector=checked_selector,
                    priority=priority,
                    document=checked,
                    updated_at_ms=at,
                )
            )
            return Policy(name, row.version + 1, checked_selector, priority, checked, at)

        for _ in range(3):
            try:
                return self._db.write(put)
            except _CreatedMeanwhile:
                continue
        raise StoreUnavailable(f"policy {name!r} kept changing under concurrent writers; try again")

    def get(self, name: str) -> Policy:
        """The policy `name`; NotFound if there is none."""
        check_policy_name(name)
        row = self._db.read(lambda conn: conn.execute(sa.select(policies).where(policies.c.name == name)).one_or_none())
        if row is None:
            raise NotFound(f"no policy named {name!r} (fleetctl policies list shows them)")
        return _policy(row)

    def list(self) -> list[Policy]:
        """Every policy, by name."""
        rows = self._db.read(lambda conn: conn.execute(sa.select(policies).order_by(policies.c.name)).all())
        return [_policy(row) for row in rows]

    def delete(self, name: str) -> Policy:
        """Remove the policy `name` and return what it was; NotFound if there is none."""
        check_policy_name(name)

        def remove(conn: sa.Connection) -> Policy | None:
            row = conn.execute(sa.select(policies).where(policies.c.name == name).with_for_update()).one_or_none()
            if row is not None:
                conn.execute(policies.delete().where(policies.c.name == name))
            return None if row is None else _policy(row)

        removed = self._db.write(remove)
        if removed is None:
            raise NotFound(f"no policy named {name!r} (fleetctl policies list shows them)")
        return removed
