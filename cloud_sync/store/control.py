"""The control plane's state in the cloud store: each device's desired state and the last state it reported.

Checks of both messages are plain functions (`check_desired`, `check_reported`), run before any transaction.
Not the transport (cloud_sync/control.py serves them over gRPC) nor how a desired state is computed.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import sqlalchemy as sa

from cloud_sync.errors import DeviceRevoked, InvalidArgument, NotFound
from cloud_sync.store.database import Database, now_ms
from cloud_sync.store.schema import devices, metadata
from edgefleet.proto.edgefleet.v1.state_pb2 import DesiredState, ModelRole, ModelState, ReportedState

__all__ = [
    "MAX_STATE_BYTES",
    "POLICY_SECTIONS",
    "ControlStore",
    "StoredReport",
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
# What a policy document may hold: the agent's live-applicable config sections (edge_runtime/policy.py checks
# each key against its own types; the cloud checks the shape, so an operator's typo fails here first).
POLICY_SECTIONS = ("inference", "upload", "buffer", "telemetry")
_ROLES = frozenset(ModelRole.values())
_STATES = frozenset(ModelState.values())
_IN_CHUNK = 1000

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

    def on_desired(self, listener: Callable[[str, int], None]) -> None:
        """Call `listener(device_id, generation)` after each committed set_desired."""
        self._listeners.append(listener)

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

        generation = self._db.write(write)
        for listener in self._listeners:
            listener(device_id, generation)
        body.generation = generation
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
                raise InvalidArgument(
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
