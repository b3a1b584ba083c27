"""The audit log: one record per change to the fleet (who or which gate, what, target, when, before/after, why).

A store whose change and record can share a transaction calls `insert_audit(conn, draft)` inside it (tokens,
rollouts); the API writes the others with `AuditLog.record` right after the change commits. Reading is
`AuditLog.query`, newest first. Not the rules of who may change what (cloud_sync/api_auth.py).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

import sqlalchemy as sa

from cloud_sync.errors import InvalidArgument
from cloud_sync.store.database import Database, now_ms
from cloud_sync.store.schema import metadata

__all__ = ["MAX_AUDIT_PAGE", "ActorKind", "AuditDraft", "AuditLog", "AuditRecord", "audit_log", "insert_audit"]

_RowId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
MAX_AUDIT_PAGE = 1000
ActorKind = Literal["token", "gate", "controller", "system"]

audit_log = sa.Table(
    "audit_log",
    metadata,
    sa.Column("id", _RowId, primary_key=True, autoincrement=True),
    sa.Column("at_ms", sa.BigInteger, nullable=False),
    # A token's name, "gate:<gate>", "controller" or "cloud-sync".
    sa.Column("actor", sa.Text, nullable=False),
    sa.Column("actor_kind", sa.Text, nullable=False),
    # "rollout.create", "policy.set", "token.revoke"...
    sa.Column("action", sa.Text, nullable=False),
    # "<kind>/<id>": "rollout/ro-0123456789", "policy/lab", "token/ops-alice".
    sa.Column("target", sa.Text, nullable=False),
    sa.Column("before", sa.JSON, nullable=True),
    sa.Column("after", sa.JSON, nullable=True),
    sa.Column("reason", sa.Text, nullable=False),
    sa.Index(None, "at_ms"),
    sa.Index(None, "actor", "id"),
    sa.Index(None, "target", "id"),
)


def actor_kind(actor: str) -> ActorKind:
    """What kind of actor a name is: gates and the controller by their names, cloud-sync itself, else a token."""
    if actor.startswith("gate:"):
        return "gate"
    if actor == "controller":
        return "controller"
    if actor == "cloud-sync":
        return "system"
    return "token"


@dataclass(frozen=True)
class AuditDraft:
    """A record to write (its id and time are the store's)."""

    actor: str
    action: str
    target: str
    before: dict[str, Any] | None = None
    after: dict[str, Any] | None = None
    reason: str = ""


@dataclass(frozen=True)
class AuditRecord:
    id: int
    at_ms: int
    actor: str
    actor_kind: str
    action: str
    target: str
    before: dict[str, Any] | None
    after: dict[str, Any] | None
    reason: str

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def insert_audit(conn: sa.Connection, draft: AuditDraft, at_ms: int | None = None) -> int:
    """Write `draft` on `conn` (inside the change's own transaction); its id."""
    values = {
        "at_ms": now_ms() if at_ms is None else at_ms,
        "actor": draft.actor,
        "actor_kind": actor_kind(draft.actor),
        "action": draft.action,
        "target": draft.target,
        "before": draft.before,
        "after": draft.after,
        "reason": draft.reason,
    }
    key = conn.execute(audit_log.insert().values(**values)).inserted_primary_key
    assert key is not None
    return int(key[0])


def _record(row: Any) -> AuditRecord:
    return AuditRecord(
        id=int(row.id),
        at_ms=int(row.at_ms),
        actor=row.actor,
        actor_kind=row.actor_kind,
        action=row.action,
        target=row.target,
        before=row.before,
        after=row.after,
        reason=row.reason,
    )


class AuditLog:
    """The audit records of one cloud store. Thread-safe; synchronous (call it off the event loop)."""

    def __init__(self, db: Database) -> None:
        self.db = db

    def record(self, draft: AuditDraft) -> int:
        """Write one record in its own transaction (after a change that could not share one); its id."""
        return self.db.write(lambda conn: insert_audit(conn, draft))

    def query(
        self,
        since_ms: int = 0,
        actor: str | None = None,
        action: str | None = None,
        target: str | None = None,
        limit: int = 100,
        before_id: int | None = None,
    ) -> list[AuditRecord]:
        """Records matching every filter given, newest first; `before_id` pages on (ids below it)."""
        if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_AUDIT_PAGE:
            raise InvalidArgument(f"limit {limit!r}: a number of records from 1 to {MAX_AUDIT_PAGE}")
        c = audit_log.c
        query = sa.select(audit_log).order_by(c.id.desc()).limit(limit)
        if since_ms:
            query = query.where(c.at_ms >= since_ms)
        if actor is not None:
            query = query.where(c.actor == actor)
        if action is not None:
            query = query.where(c.action == action)
        if target is not None:
            query = query.where(c.target == target)
        if before_id is not None:
            query = query.where(c.id < before_id)
        return [_record(row) for row in self.db.read(lambda conn: conn.execute(query).all())]
