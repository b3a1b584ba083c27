"""The control plane's state in the cloud store: each device's desired state and the last state it reported.

Checks of both messages are plain functions (`check_desired`, `check_reported`), run before any transaction.
Not the transport (cloud_sync/control.py serves them over gRPC) nor how a desired state is computed.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa

from cloud_sync.errors import CloudSyncError, DeviceRevoked, InvalidArgument, NotFound
from cloud_sync.store.database import Database, now_ms
from cloud_sync.store.schema import devices, metadata

# What a policy document may hold: the agent's live-applicable config sections (edge_runtime/policy.py checks
# each key against its own types; the cloud checks the shape, so an operator's typo fails here first).
from edgefleet.policy import POLICY_SECTIONS
from edgefleet.proto.edgefleet.v1.state_pb2 import DesiredState, ModelRole, ModelState, ReportedState

__all__ = [
    "MAX_STATE_BYTES",
    "POLICY_SECTIONS",
    "ControlStore",
    "StaleReport",
    "StoredReport",
    "StoredState",
    "check_desired",
    "check_reported",
    "desired_state",
    "reported_state",
]

# A state listing a few dozen models is a few KiB; past this it is not a state but a mistake (or an attack).
MAX_STATE_BYTES = 64 * 1024
MAX_MODELS = 256
_MAX_NAME_CHARS = 256
_MAX_TEXT_CHARS = 4096
_MAX_GENERATION = 2**63 - 1  # BIGINT
_ROLES = frozenset(ModelRole.values())
_STATES = frozenset(ModelState.values())
_IN_CHUNK = 1000
# Devices per transaction of set_desired_many: one reconcile of 10,000 devices is 20 short transactions, so
# ingest and reports on the same SQLite file wait at most one chunk's time for the write lock.
DESIRED_CHUNK = 500

# One row per device that was ever given a desired state. The generation lives in its own column (the
# payload holds the message without it), so assigning the next one is a single UPDATE under the row lock.
desired_state = sa.Table(
    "desired_state",
    metadata,
    sa.Column("device_id", sa.Text, sa.ForeignKey("devices.device_id"), primary_key=True),
    sa.Column("generation", sa.BigInteger, nullable=False),
    sa.Column("payload", sa.LargeBinary, nullable=False),
    sa.Column("issued_at_ms", sa.BigInteger, nullable=False),
)

reported_state = sa.Table(
    "reported_state",
    metadata,
    sa.Column("device_id", sa.Text, sa.ForeignKey("devices.device_id"), primary_key=True),
    sa.Column("generation", sa.BigInteger, nullable=False),
    sa.Column("payload", sa.LargeBinary, nullable=False),
    sa.Column("received_at_ms", sa.BigInteger, nullable=False),
)


@dataclass(frozen=True)
class StoredReport:
    device_id: str
    state: ReportedState
    received_at_ms: int


class StaleReport(InvalidArgument):
    """A report below the generation the device reported before (it arrived late); dropped."""


@dataclass(frozen=True)
class StoredState:
    """A device's current desired generation and its last report's generation and time (None: no report)."""

    device_id: str
    desired_generation: int
    issued_at_ms: int
    reported_generation: int | None
    received_at_ms: int | None


def _check_text(value: str, what: str, limit: int = _MAX_TEXT_CHARS) -> None:
    if len(value) > limit:
        raise InvalidArgument(f"{what} has {len(value)} characters (at most {limit})")


def _check_size(message: DesiredState | ReportedState, what: str) -> None:
    size = message.ByteSize()
    if size > MAX_STATE_BYTES:
        raise InvalidArgument(f"{what} of {size} bytes is past the {MAX_STATE_BYTES}-byte limit")


def check_policy_document(document: str) -> None:
    """A policy document is empty or a JSON object of policy sections, each an object; InvalidArgument if not."""
    if not document:
        return
    try:
        data = json.loads(document, parse_constant=_no_constant)
    except (ValueError, RecursionError) as exc:
        raise InvalidArgument(f"policy_json is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise InvalidArgument("policy_json must be a JSON object of policy sections")
    for name, section in data.items():
        if name not in POLICY_SECTIONS:
            raise InvalidArgument(
                f"policy_json: unknown section '{name}' (policy sections: {', '.join(POLICY_SECTIONS)})"
            )
        if not isinstance(section, dict):
            raise InvalidArgument(f"policy_json: section '{name}' must be an object of keys")


def _no_constant(name: str) -> float:
    raise ValueError(f"{name} is not a finite number")


def check_desired(state: DesiredState) -> None:
    """What an operator (or the policy engine) may set as a device's desired state; InvalidArgument if not."""
    _check_size(state, "desired state")
    if len(state.models) > MAX_MODELS:
        raise InvalidArgument(f"desired state lists {len(state.models)} models (at most {MAX_MODELS})")
    seen: set[str] = set()
    for m in state.models:
        if not 0 < len(m.name) <= _MAX_NAME_CHARS or m.version < 1:
            raise InvalidArgument("every model assignment needs a name and a version >= 1")
        if m.role not in _ROLES or m.role == ModelRole.MODEL_ROLE_UNSPECIFIED:
            raise InvalidArgument(f"model {m.name[:64]!r} version {m.version}: role must be ACTIVE or SHADOW")
        if m.role == ModelRole.MODEL_ROLE_ACTIVE:
            if m.name in seen:
                raise InvalidArgument(f"model {m.name[:64]!r} has two ACTIVE versions")
            seen.add(m.name)
        if not 0.0 <= m.shadow_sample_rate <= 1.0:  # NaN fails too
            raise InvalidArgument(f"model {m.name[:64]!r}: shadow_sample_rate must be within 0..1")
    _check_text(state.policy_hash, "policy_hash", 128)
    check_policy_document(state.policy_json)


def check_reported(device_id: str, state: ReportedState) -> None:
    """What a device may report, as `device_id` (its credential's); InvalidArgument if not."""
    _check_size(state, "reported state")
    if state.device_id != device_id:
        raise InvalidArgument(
            f"reported state names device {state.device_id[:128]!r} but the credential is {device_id!r}'s"
        )
    if state.generation > _MAX_GENERATION or state.reported_at_ms < 0:
        raise InvalidArgument("generation or reported_at_ms out of range")
    if len(state.models) > MAX_MODELS:
        raise InvalidArgument(f"reported state lists {len(state.models)} models (at most {MAX_MODELS})")
    for m in state.models:
        where = f"model {m.name[:64]!r} version {m.version}"
        if not 0 < len(m.name) <= _MAX_NAME_CHARS or m.version < 1:
            raise InvalidArgument("every model status needs a name and a version >= 1")
        if m.role not in _ROLES or m.state not in _STATES:
            raise InvalidArgument(f"{where}: unknown role or state")
        if not (0.0 <= m.progress <= 1.0) or math.isnan(m.progress):
            raise InvalidArgument(f"{where}: progress must be within 0..1")
        _check_text(m.reason, f"{where}: reason")
        _check_text(m.backend, f"{where}: backend", _MAX_NAME_CHARS)
    _check_text(state.error, "error")
    _check_text(state.policy_hash, "policy_hash", 128)


# Locks the device's row for the transaction (FOR UPDATE renders to nothing on SQLite, where BEGIN IMMEDIATE
# already made this transaction the only writer), so two changes of one device take turns.
_LOCK_DEVICE = (
    sa.select(devices.c.revoked_at_ms).where(devices.c.device_id == sa.bindparam("device_id")).with_for_update()
)


def _locked_device(conn: sa.Connection, device_id: str) -> None:
    row = conn.execute(_LOCK_DEVICE, {"device_id": device_id}).one_or_none()
    if row is None:
        raise NotFound(f"no device {device_id!r} is registered")
    if row.revoked_at_ms is not None:
        raise DeviceRevoked(f"device {device_id!r} was revoked")


def _generation(conn: sa.Connection, table: sa.Table, device_id: str) -> int:
    found = conn.execute(sa.select(table.c.generation).where(table.c.device_id == device_id)).scalar_one_or_none()
    return int(found or 0)


class ControlStore:
    """Desired and reported states over a Database. Thread-safe; synchronous (call it off the event loop).

    `on_desired` listeners are called (on the writing thread) after a new desired state is committed, so an
    open WatchDesired stream in this process sends it at once; other replicas find it by polling
    `desired_generations`.
    """

    def __init__(self, db: Database) -> None:
        self._db = db
        self._listeners: list[Callable[[str, int], None]] = []
        self._state_listeners: list[Callable[[DesiredState], None]] = []

    def on_desired(self, listener: Callable[[str, int], None]) -> None:
        """Call `listener(device_id, generation)` after each committed set_desired."""
        self._listeners.append(listener)

    def on_desired_state(self, listener: Callable[[DesiredState], None]) -> None:
        """Call `listener(state)` with each new desired state (device id and generation set) after its commit."""
        self._state_listeners.append(listener)

    def _committed(self, body: DesiredState) -> None:
        for listener in self._listeners:
            listener(body.device_id, body.generation)
        for state_listener in self._state_listeners:
            state_listener(body)

    def set_desired(self, device_id: str, state: DesiredState) -> DesiredState:
        """Make `state` the device's desired state under the next generation; returns it as stored.

        The generation is assigned here, above both the last one issued and the last one the device reported
        (a device ahead of a restored database would otherwise ignore every new state). The message's own
        device_id, generation and issued_at_ms are replaced. Raises InvalidArgument, NotFound, DeviceRevoked.
        """
        check_desired(state)
        issued = now_ms()
        body = DesiredState()
        body.CopyFrom(state)
        body.device_id, body.generation, body.issued_at_ms = device_id, 0, issued
        payload = body.SerializeToString()

        def write(conn: sa.Connection) -> int:
            _locked_device(conn, device_id)
            generation = 1 + max(
                _generation(conn, desired_state, device_id), _generation(conn, reported_state, device_id)
            )
            row = {"generation": generation, "payload": payload, "issued_at_ms": issued}
            updated = conn.execute(desired_state.update().where(desired_state.c.device_id == device_id).values(**row))
            if not updated.rowcount:
                conn.execute(desired_state.insert().values(device_id=device_id, **row))
            return generation

        body.generation = self._db.write(write)
        self._committed(body)
        return body

    def desired(self, device_id: str) -> DesiredState | None:
        """The device's current desired state, or None if it was never given one."""
        query = sa.select(desired_state).where(desired_state.c.device_id == device_id)
        row = self._db.read(lambda conn: conn.execute(query).one_or_none())
        if row is None:
            return None
        state = DesiredState.FromString(bytes(row.payload))
        state.generation = row.generation
        return state

    def desired_generations(self, device_ids: Iterable[str]) -> dict[str, int]:
        """The current desired generation of each of `device_ids` that has one."""
        ids = sorted(set(device_ids))

        def query(conn: sa.Connection) -> dict[str, int]:
            found: dict[str, int] = {}
            for start in range(0, len(ids), _IN_CHUNK):
                chunk = ids[start : start + _IN_CHUNK]
                q = sa.select(desired_state.c.device_id, desired_state.c.generation).where(
                    desired_state.c.device_id.in_(chunk)
                )
                found.update({r.device_id: int(r.generation) for r in conn.execute(q)})
            return found

        return self._db.read(query) if ids else {}

    def report(self, device_id: str, state: ReportedState) -> None:
        """Store what the device reports (as `device_id`, from its credential).

        Refused with InvalidArgument: a malformed state, a generation the cloud never issued, or one below the
        generation the device reported before (a stale report arriving late must not undo a newer one). The
        same generation again is accepted: a model's state changes while the generation stays.
        """
        check_reported(device_id, state)
        payload = state.SerializeToString()
        received = now_ms()

        def write(conn: sa.Connection) -> None:
            _locked_device(conn, device_id)
            issued = _generation(conn, desired_state, device_id)
            if state.generation > issued:
                raise InvalidArgument(
                    f"reported generation {state.generation} was never issued (the newest is {issued})"
                )
            before = conn.execute(
                sa.select(reported_state.c.generation).where(reported_state.c.device_id == device_id)
            ).scalar_one_or_none()
            row = {"generation": state.generation, "payload": payload, "received_at_ms": received}
            if before is None:
                conn.execute(reported_state.insert().values(device_id=device_id, **row))
                return
            if state.generation < before:
                raise StaleReport(
                    f"reported generation {state.generation} is below the {before} reported before: a stale report"
                )
            conn.execute(reported_state.update().where(reported_state.c.device_id == device_id).values(**row))

        self._db.write(write)

    def reported(self, device_id: str) -> StoredReport | None:
        """The last state the device reported, or None."""
        query = sa.select(reported_state).where(reported_state.c.device_id == device_id)
        row = self._db.read(lambda conn: conn.execute(query).one_or_none())
        if row is None:
            return None
        return StoredReport(device_id, ReportedState.FromString(bytes(row.payload)), row.received_at_ms)

    # -- bulk reads and writes (the reconciler, the MQTT control link) ------------------------------------

    def set_desired_many(self, states: Mapping[str, DesiredState]) -> dict[str, int]:
        """Give each device its new desired state, DESIRED_CHUNK devices per transaction; {device: generation}.

        Generations are assigned as set_desired's. A device that is unknown or was revoked meanwhile is left
        out of the result (the reconciler reads the fleet before writing). Listeners are called per device
        after its chunk committed. Raises InvalidArgument (before any write) if any state is malformed.
        """
        for state in states.values():
            check_desired(state)
        issued = now_ms()
        messages: dict[str, DesiredState] = {}
        bodies: dict[str, bytes] = {}
        for device_id, state in states.items():
            body = messages[device_id] = DesiredState()
            body.CopyFrom(state)
            body.device_id, body.generation, body.issued_at_ms = device_id, 0, issued
            bodies[device_id] = body.SerializeToString()
        written: dict[str, int] = {}
        ids = sorted(bodies)
        for start in range(0, len(ids), DESIRED_CHUNK):
            chunk = {device_id: bodies[device_id] for device_id in ids[start : start + DESIRED_CHUNK]}
            generations = self._db.write(functools.partial(_write_desired_chunk, chunk=chunk, issued=issued))
            written.update(generations)
            for device_id, generation in generations.items():
                messages[device_id].generation = generation
                self._committed(messages[device_id])
        return written

    def desired_many(self, device_ids: Iterable[str] | None = None) -> dict[str, DesiredState]:
        """The current desired state of every device that has one (of `device_ids` only, if given)."""
        rows = self._rows(desired_state, device_ids)
        found: dict[str, DesiredState] = {}
        for row in rows:
            state = DesiredState.FromString(bytes(row.payload))
            state.generation = row.generation
            found[row.device_id] = state
        return found

    def reported_many(self, device_ids: Iterable[str] | None = None) -> dict[str, StoredReport]:
        """The last report of every device that has one (of `device_ids` only, if given)."""
        return {
            row.device_id: StoredReport(row.device_id, ReportedState.FromString(bytes(row.payload)), row.received_at_ms)
            for row in self._rows(reported_state, device_ids)
        }

    def generations(self) -> dict[str, StoredState]:
        """Desired vs reported generation of every device that has a desired state, in one query."""
        query = sa.select(
            desired_state.c.device_id,
            desired_state.c.generation,
            desired_state.c.issued_at_ms,
            reported_state.c.generation.label("reported"),
            reported_state.c.received_at_ms,
        ).select_from(desired_state.outerjoin(reported_state, desired_state.c.device_id == reported_state.c.device_id))
        rows = self._db.read(lambda conn: conn.execute(query).all())
        return {
            r.device_id: StoredState(
                r.device_id,
                int(r.generation),
                int(r.issued_at_ms),
                None if r.reported is None else int(r.reported),
                None if r.received_at_ms is None else int(r.received_at_ms),
            )
            for r in rows
        }

    def report_many(self, reports: Sequence[tuple[str, ReportedState]]) -> list[CloudSyncError | None]:
        """Store many reports in one transaction; for each, None (stored) or why it was refused.

        Each report is judged as `report` judges it (malformed, never issued, stale, unknown or revoked device:
        refused, and nothing of it stored); refusals never fail the others. Of several reports of one device
        in the batch, each is judged against the ones before it.
        """
        outcome: list[CloudSyncError | None] = [None] * len(reports)
        payloads: dict[int, bytes] = {}
        for i, (device_id, state) in enumerate(reports):
            try:
                check_reported(device_id, state)
                payloads[i] = state.SerializeToString()
            except InvalidArgument as exc:
                outcome[i] = exc
        if not payloads:
            return outcome
        received = now_ms()

        def write(conn: sa.Connection) -> list[CloudSyncError | None]:
            judged = list(outcome)
            ids = sorted({reports[i][0] for i in payloads})
            known = _select_in(conn, sa.select(devices.c.device_id, devices.c.revoked_at_ms), devices.c.device_id, ids)
            revoked = {r.device_id for r in known if r.revoked_at_ms is not None}
            registered = {r.device_id for r in known}
            issued = _generations_in(conn, desired_state, ids)
            before = _generations_in(conn, reported_state, ids)
            had_report = set(before)
            newest: dict[str, tuple[int, bytes]] = {}
            for i, payload in payloads.items():
                device_id, state = reports[i]
                judged[i] = _judge_report(device_id, state.generation, registered, revoked, issued, before)
                if judged[i] is None:
                    before[device_id] = state.generation
                    newest[device_id] = (state.generation, payload)
            _store_reports(conn, newest, received, had_report)
            return judged

        return self._db.write(write)

    def reporting(self, name: str, version: int) -> list[str]:
        """The devices whose last report lists model `name` at `version` (in any state but FAILED)."""
        return sorted(
            device_id
            for device_id, report in self.reported_many().items()
            if any(
                m.name == name and m.version == version and m.state != ModelState.MODEL_STATE_FAILED
                for m in report.state.models
            )
        )

    def _rows(self, table: sa.Table, device_ids: Iterable[str] | None) -> list[Any]:
        if device_ids is None:
            return list(self._db.read(lambda conn: conn.execute(sa.select(table)).all()))
        ids = sorted(set(device_ids))
        return self._db.read(lambda conn: _select_in(conn, sa.select(table), table.c.device_id, ids)) if ids else []


def _select_in(conn: sa.Connection, query: sa.Select[Any], column: sa.ColumnElement[Any], ids: list[str]) -> list[Any]:
    rows: list[Any] = []
    for start in range(0, len(ids), _IN_CHUNK):
        rows.extend(conn.execute(query.where(column.in_(ids[start : start + _IN_CHUNK]))).all())
    return rows


def _generations_in(conn: sa.Connection, table: sa.Table, ids: list[str]) -> dict[str, int]:
    query = sa.select(table.c.device_id, table.c.generation)
    return {r.device_id: int(r.generation) for r in _select_in(conn, query, table.c.device_id, ids)}


def _judge_report(
    device_id: str,
    generation: int,
    registered: set[str],
    revoked: set[str],
    issued: dict[str, int],
    before: dict[str, int],
) -> CloudSyncError | None:
    if device_id not in registered:
        return NotFound(f"no device {device_id!r} is registered")
    if device_id in revoked:
        return DeviceRevoked(f"device {device_id!r} was revoked")
    newest = issued.get(device_id, 0)
    if generation > newest:
        return InvalidArgument(f"reported generation {generation} was never issued (the newest is {newest})")
    if generation < before.get(device_id, 0):
        return StaleReport(
            f"reported generation {generation} is below the {before[device_id]} reported before: a stale report"
        )
    return None


def _store_reports(
    conn: sa.Connection, newest: dict[str, tuple[int, bytes]], received: int, had_report: set[str]
) -> None:
    updates = [
        {"b_device_id": d, "generation": g, "payload": p, "received_at_ms": received}
        for d, (g, p) in newest.items()
        if d in had_report
    ]
    inserts = [
        {"device_id": d, "generation": g, "payload": p, "received_at_ms": received}
        for d, (g, p) in newest.items()
        if d not in had_report
    ]
    if updates:
        conn.execute(reported_state.update().where(reported_state.c.device_id == sa.bindparam("b_device_id")), updates)
    if inserts:
        conn.execute(reported_state.insert(), inserts)


def _write_desired_chunk(conn: sa.Connection, chunk: dict[str, bytes], issued: int) -> dict[str, int]:
    """One transaction of set_desired_many: lock the chunk's live devices, then bump their generations."""
    ids = sorted(chunk)
    lock = sa.select(devices.c.device_id, devices.c.revoked_at_ms).with_for_update()
    live = sorted(r.device_id for r in _select_in(conn, lock, devices.c.device_id, ids) if r.revoked_at_ms is None)
    desired_before = _generations_in(conn, desired_state, live)
    reported_before = _generations_in(conn, reported_state, live)
    generations = {d: 1 + max(desired_before.get(d, 0), reported_before.get(d, 0)) for d in live}
    rows = [{"b_device_id": d, "generation": generations[d], "payload": chunk[d], "issued_at_ms": issued} for d in live]
    updates = [row for row in rows if row["b_device_id"] in desired_before]
    inserts = [
        {
            "device_id": row["b_device_id"],
            "generation": row["generation"],
            "payload": row["payload"],
            "issued_at_ms": issued,
        }
        for row in rows
        if row["b_device_id"] not in desired_before
    ]
    if updates:
        conn.execute(desired_state.update().where(desired_state.c.device_id == sa.bindparam("b_device_id")), updates)
    if inserts:
        conn.execute(desired_state.insert(), inserts)
    return generations
