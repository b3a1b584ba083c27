"""Rollouts and their events in the cloud store, with transitions that check the state they move from.

A transition is one transaction: it updates the rollout only if it is still in the state and stage the caller
saw (so two replicas or two operators never step it twice), appends its events and, on completion, points the
assignment at the new version. Not the rules of which transition is allowed when (service.py).
"""

from __future__ import annotations

import builtins
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import sqlalchemy as sa

from cloud_sync.errors import FailedPrecondition, NotFound
from cloud_sync.rollouts.plan import ACTIVE_STATES, Gates, Rollout, RolloutEvent, Stage, State, check_rollout_id
from cloud_sync.selectors import format_selector
from cloud_sync.store.assignments import model_assignments
from cloud_sync.store.audit import AuditDraft, insert_audit
from cloud_sync.store.database import Database, now_ms
from cloud_sync.store.schema import metadata

__all__ = ["EventDraft", "RolloutStore", "rollout_events", "rollouts"]

_RowId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
_MAX_EVENTS = 1000
# Any constant: creating rollouts of one database takes turns under it on PostgreSQL (the overlap check).
_CREATE_LOCK_KEY = 0x6566_726F_6C6C_6372  # "efrollcr"

rollouts = sa.Table(
    "rollouts",
    metadata,
    sa.Column("id", sa.Text, primary_key=True),
    sa.Column("model", sa.Text, nullable=False),
    sa.Column("from_version", sa.BigInteger, nullable=False),
    sa.Column("to_version", sa.BigInteger, nullable=False),
    sa.Column("selector", sa.JSON, nullable=False),
    sa.Column("stages", sa.JSON, nullable=False),
    sa.Column("gates", sa.JSON, nullable=False),
    sa.Column("shadow_sample_rate", sa.Float, nullable=False),
    sa.Column("state", sa.Text, nullable=False),
    sa.Column("stage_index", sa.Integer, nullable=False),
    sa.Column("stage_started_at_ms", sa.BigInteger, nullable=False),
    sa.Column("created_at_ms", sa.BigInteger, nullable=False),
    sa.Column("updated_at_ms", sa.BigInteger, nullable=False),
    sa.Column("reason", sa.Text, nullable=False),
    sa.Column("last_evaluation", sa.JSON, nullable=True),
    sa.Index(None, "state"),
    sa.Index(None, "model"),
)

rollout_events = sa.Table(
    "rollout_events",
    metadata,
    sa.Column("id", _RowId, primary_key=True, autoincrement=True),
    sa.Column("rollout_id", sa.Text, sa.ForeignKey("rollouts.id"), nullable=False),
    sa.Column("at_ms", sa.BigInteger, nullable=False),
    sa.Column("kind", sa.Text, nullable=False),
    sa.Column("actor", sa.Text, nullable=False),
    sa.Column("reason", sa.Text, nullable=False),
    sa.Column("stage_index", sa.Integer, nullable=False),
    sa.Column("values", sa.JSON, nullable=False),
    sa.Index(None, "rollout_id", "id"),
)


@dataclass(frozen=True)
class EventDraft:
    """An event to append with a transition (its id and time are the store's)."""

    kind: str
    actor: str
    reason: str
    values: dict[str, Any] = field(default_factory=dict)


def _rollout(row: Any) -> Rollout:
    return Rollout(
        id=row.id,
        model=row.model,
        from_version=int(row.from_version),
        to_version=int(row.to_version),
        selector=dict(row.selector),
        stages=[Stage(s["mode"], float(s["percent"]), float(s["bake_s"])) for s in row.stages],
        gates=Gates(**row.gates),
        shadow_sample_rate=float(row.shadow_sample_rate),
        state=row.state,
        stage_index=int(row.stage_index),
        stage_started_at_ms=int(row.stage_started_at_ms),
        created_at_ms=int(row.created_at_ms),
        updated_at_ms=int(row.updated_at_ms),
        reason=row.reason,
        last_evaluation=row.last_evaluation,
    )


def _event(row: Any) -> RolloutEvent:
    return RolloutEvent(
        id=int(row.id),
        rollout_id=row.rollout_id,
        at_ms=int(row.at_ms),
        kind=row.kind,
        actor=row.actor,
        reason=row.reason,
        values=dict(row.values),
        stage_index=int(row.stage_index),
    )


def overlaps(a: dict[str, str], b: dict[str, str]) -> bool:
    """Whether some device's labels could meet both selectors (no key is required to differ)."""
    return all(b[key] == value for key, value in a.items() if key in b)


def _insert_events(
    conn: sa.Connection, rollout_id: str, stage_index: int, at: int, events: Sequence[EventDraft]
) -> list[int]:
    """Append `events` (one insert each: a transition has one to three); their ids."""
    ids = []
    for e in events:
        values = {
            "rollout_id": rollout_id,
            "at_ms": at,
            "kind": e.kind,
            "actor": e.actor,
            "reason": e.reason,
            "stage_index": stage_index,
            "values": e.values,
        }
        key = conn.execute(rollout_events.insert().values(**values)).inserted_primary_key
        assert key is not None
        ids.append(int(key[0]))
    return ids


def _audit(conn: sa.Connection, audit: AuditDraft | None, event_ids: list[int], at: int) -> None:
    """The transition's audit record, in its transaction: it points at the events, which hold the values that
    decided it (a gate's figures), rather than copying them."""
    if audit is not None:
        insert_audit(conn, replace(audit, after={**(audit.after or {}), "event_ids": event_ids}), at)


def _upsert_assignment(conn: sa.Connection, model: str, version: int, selector: dict[str, str], priority: int) -> None:
    """AssignmentStore.assign's write, inside the completing transaction (so no abort can slip between)."""
    key, stamp = format_selector(selector), now_ms()
    where = (model_assignments.c.name == model) & (model_assignments.c.selector_key == key)
    values = {"selector": selector, "version": version, "priority": priority, "updated_at_ms": stamp}
    if not conn.execute(model_assignments.update().where(where).values(**values)).rowcount:
        conn.execute(model_assignments.insert().values(name=model, selector_key=key, created_at_ms=stamp, **values))


class RolloutStore:
    """Rollouts over a Database. Thread-safe; synchronous (call it off the event loop)."""

    def __init__(self, db: Database) -> None:
        self.db = db

    def insert(self, rollout: Rollout, event: EventDraft, audit: AuditDraft | None = None) -> Rollout:
        """Store a new rollout, its "created" event and `audit`; FailedPrecondition if a rollout of the same
        model in progress has an overlapping selector (checked in the same transaction)."""

        def write(conn: sa.Connection) -> None:
            if conn.dialect.name == "postgresql":
                conn.execute(sa.select(sa.func.pg_advisory_xact_lock(_CREATE_LOCK_KEY)))
            query = sa.select(rollouts.c.id, rollouts.c.selector).where(
                rollouts.c.model == rollout.model, rollouts.c.state.in_(ACTIVE_STATES)
            )
            for row in conn.execute(query):
                if overlaps(dict(row.selector), rollout.selector):
                    raise FailedPrecondition(
                        f"rollout {row.id} of model {rollout.model!r} is in progress on devices this selector "
                        f"({format_selector(rollout.selector)}) also picks: abort it or wait until it ends"
                    )
            data = rollout.to_json()
            conn.execute(rollouts.insert().values(**{c.name: data[c.name] for c in rollouts.columns}))
            ids = _insert_events(conn, rollout.id, 0, rollout.created_at_ms, [event])
            _audit(conn, audit, ids, rollout.created_at_ms)

        self.db.write(write)
        return rollout

    def get(self, rollout_id: str) -> Rollout:
        check_rollout_id(rollout_id)
        query = sa.select(rollouts).where(rollouts.c.id == rollout_id)
        row = self.db.read(lambda conn: conn.execute(query).one_or_none())
        if row is None:
            raise NotFound(f"no rollout {rollout_id!r}")
        return _rollout(row)

    def list(self, state: State | None = None) -> builtins.list[Rollout]:
        """Every rollout (in `state` only, if given), newest first."""
        query = sa.select(rollouts).order_by(rollouts.c.created_at_ms.desc(), rollouts.c.id)
        if state is not None:
            query = query.where(rollouts.c.state == state)
        return [_rollout(row) for row in self.db.read(lambda conn: conn.execute(query).all())]

    def in_progress(self) -> builtins.list[Rollout]:
        """The running and paused rollouts (those that shape desired states)."""
        query = sa.select(rollouts).where(rollouts.c.state.in_(ACTIVE_STATES)).order_by(rollouts.c.id)
        return [_rollout(row) for row in self.db.read(lambda conn: conn.execute(query).all())]

    def events(self, rollout_id: str, after_id: int = 0, limit: int = _MAX_EVENTS) -> builtins.list[RolloutEvent]:
        """The rollout's events with an id above `after_id`, oldest first (NotFound for an unknown rollout)."""
        self.get(rollout_id)
        query = (
            sa.select(rollout_events)
            .where(rollout_events.c.rollout_id == rollout_id, rollout_events.c.id > after_id)
            .order_by(rollout_events.c.id)
            .limit(limit)
        )
        return [_event(row) for row in self.db.read(lambda conn: conn.execute(query).all())]

    def transition(
        self,
        seen: Rollout,
        changes: dict[str, Any],
        events: Sequence[EventDraft],
        assign: Callable[[sa.Connection], None] | None = None,
        audit: AuditDraft | None = None,
    ) -> Rollout:
        """Apply `changes` if the rollout is still in `seen`'s state and stage; FailedPrecondition if not.

        `events` and `audit` are appended and `assign` (the completion's assignment) runs in the same
        transaction; a refused transition writes none of them.
        """
        stamp = now_ms()

        def write(conn: sa.Connection) -> Any:
            where = (
                (rollouts.c.id == seen.id)
                & (rollouts.c.state == seen.state)
                & (rollouts.c.stage_index == seen.stage_index)
            )
            if not conn.execute(rollouts.update().where(where).values(updated_at_ms=stamp, **changes)).rowcount:
                now = conn.execute(sa.select(rollouts.c.state, rollouts.c.stage_index).where(rollouts.c.id == seen.id))
                found = now.one_or_none()
                if found is None:
                    raise NotFound(f"no rollout {seen.id!r}")
                raise FailedPrecondition(
                    f"rollout {seen.id} is {found.state} at stage {found.stage_index + 1}, no longer {seen.state} "
                    f"at stage {seen.stage_index + 1}: someone else moved it; look again"
                )
            ids = _insert_events(conn, seen.id, int(changes.get("stage_index", seen.stage_index)), stamp, events)
            _audit(conn, audit, ids, stamp)
            if assign is not None:
                assign(conn)
            return conn.execute(sa.select(rollouts).where(rollouts.c.id == seen.id)).one()

        return _rollout(self.db.write(write))

    def record_evaluation(self, seen: Rollout, evaluation: dict[str, Any]) -> bool:
        """Keep the controller's last verdict on the rollout if it is still at `seen`'s state and stage."""

        def write(conn: sa.Connection) -> bool:
            where = (
                (rollouts.c.id == seen.id)
                & (rollouts.c.state == seen.state)
                & (rollouts.c.stage_index == seen.stage_index)
            )
            return bool(conn.execute(rollouts.update().where(where).values(last_evaluation=evaluation)).rowcount)

        return self.db.write(write)


def completion_assignment(
    model: str, version: int, selector: dict[str, str], priority: int
) -> Callable[[sa.Connection], None]:
    """The write that points (model, selector)'s assignment at `version` (for RolloutStore.transition)."""
    return lambda conn: _upsert_assignment(conn, model, version, selector, priority)
