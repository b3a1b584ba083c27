"""Model assignments: which version of a model the devices a label selector picks should run.

One row per (model, selector); the desired state of each device is computed from these (cloud_sync/desired.py).
Not the registry of versions (cloud_sync/registry/) nor the per-device desired state (store/control.py).
"""

from __future__ import annotations

import builtins
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa

from cloud_sync.errors import InvalidArgument, NotFound
from cloud_sync.selectors import check_selector, format_selector
from cloud_sync.store.database import Database, now_ms
from cloud_sync.store.schema import metadata

__all__ = ["Assignment", "AssignmentStore", "check_model_name", "model_assignments"]

# The model name alphabet of edge_runtime/models/package.py's check_ref (the cloud does not import the agent).
_MODEL_NAME = re.compile(r"[a-z0-9][a-z0-9._-]{0,62}")
_MAX_VERSION = 2**31 - 1
_MAX_PRIORITY = 1_000_000

model_assignments = sa.Table(
    "model_assignments",
    metadata,
    sa.Column("name", sa.Text, primary_key=True),
    # format_selector's text: one row per (model, selector), whatever order the terms were written in.
    sa.Column("selector_key", sa.Text, primary_key=True),
    sa.Column("selector", sa.JSON, nullable=False),
    sa.Column("version", sa.BigInteger, nullable=False),
    sa.Column("priority", sa.Integer, nullable=False),
    sa.Column("created_at_ms", sa.BigInteger, nullable=False),
    sa.Column("updated_at_ms", sa.BigInteger, nullable=False),
)


@dataclass(frozen=True)
class Assignment:
    """Devices matching `selector` should run `name` at `version` (the highest priority match wins)."""

    name: str
    version: int
    selector: dict[str, str]
    priority: int
    created_at_ms: int
    updated_at_ms: int

    def to_json(self) -> dict[str, Any]:
        return {
            "model": self.name,
            "version": self.version,
            "selector": dict(self.selector),
            "selector_text": format_selector(self.selector),
            "priority": self.priority,
            "created_at_ms": self.created_at_ms,
            "updated_at_ms": self.updated_at_ms,
        }


def check_model_name(name: object) -> str:
    """`name` if it is a valid model name, else InvalidArgument saying what is allowed."""
    if not isinstance(name, str) or not _MODEL_NAME.fullmatch(name):
        raise InvalidArgument(
            f"invalid model name {name!r}: 1-63 characters of a-z 0-9 . _ -, starting with a letter or digit"
        )
    return name


def _check_version(version: object) -> int:
    if not isinstance(version, int) or isinstance(version, bool) or not 0 < version <= _MAX_VERSION:
        raise InvalidArgument(f"invalid model version {version!r}: a positive integer below 2^31")
    return version


def _check_priority(priority: object) -> int:
    if not isinstance(priority, int) or isinstance(priority, bool) or abs(priority) > _MAX_PRIORITY:
        raise InvalidArgument(f"invalid priority {priority!r}: an integer within -{_MAX_PRIORITY}..{_MAX_PRIORITY}")
    return priority


def _assignment(row: Any) -> Assignment:
    return Assignment(
        name=row.name,
        version=int(row.version),
        selector=dict(row.selector),
        priority=int(row.priority),
        created_at_ms=int(row.created_at_ms),
        updated_at_ms=int(row.updated_at_ms),
    )


class AssignmentStore:
    """The model assignments over a Database. Thread-safe; synchronous (call it off the event loop)."""

    def __init__(self, db: Database) -> None:
        self._db = db

    def assign(self, name: str, version: int, selector: Mapping[str, str], priority: int = 0) -> Assignment:
        """Create or replace the assignment of `name` to the devices `selector` picks; returns it as stored.

        Raises InvalidArgument for a malformed name, version, selector or priority. Whether the version exists
        in the registry is the caller's check (the API refuses an unknown one).
        """
        check_model_name(name)
        _check_version(version)
        _check_priority(priority)
        checked = check_selector(selector)
        key = format_selector(checked)
        stamp = now_ms()

        def write(conn: sa.Connection) -> Assignment:
            where = (model_assignments.c.name == name) & (model_assignments.c.selector_key == key)
            values = {"selector": checked, "version": version, "priority": priority, "updated_at_ms": stamp}
            if not conn.execute(model_assignments.update().where(where).values(**values)).rowcount:
                conn.execute(
                    model_assignments.insert().values(name=name, selector_key=key, created_at_ms=stamp, **values)
                )
            return _assignment(conn.execute(sa.select(model_assignments).where(where)).one())

        return self._db.write(write)

    def unassign(self, name: str, selector: Mapping[str, str]) -> None:
        """Remove the assignment of `name` to `selector`; NotFound if there is none."""
        check_model_name(name)
        key = format_selector(check_selector(selector))

        def write(conn: sa.Connection) -> None:
            where = (model_assignments.c.name == name) & (model_assignments.c.selector_key == key)
            if not conn.execute(model_assignments.delete().where(where)).rowcount:
                raise NotFound(f"model {name!r} has no assignment for selector {key!r}")

        self._db.write(write)

    def list(self, name: str | None = None) -> list[Assignment]:
        """Every assignment (of `name` only, if given), by model name then selector."""
        query = sa.select(model_assignments).order_by(model_assignments.c.name, model_assignments.c.selector_key)
        if name is not None:
            query = query.where(model_assignments.c.name == name)
        return [_assignment(row) for row in self._db.read(lambda conn: conn.execute(query).all())]

    def uses(self, name: str, version: int) -> builtins.list[str]:
        """The assignments that name `name` at `version`, as "model:version@selector" (empty: none)."""
        query = (
            sa.select(model_assignments.c.selector_key)
            .where(model_assignments.c.name == name, model_assignments.c.version == version)
            .order_by(model_assignments.c.selector_key)
        )
        rows = self._db.read(lambda conn: conn.execute(query).all())
        return [f"assignment {name}:{version}@{row.selector_key}" for row in rows]
