"""Device telemetry and presence in the cloud store: the latest message per device, per-version windows, presence.

Idempotent upserts that run unchanged on SQLite and PostgreSQL; not validation (cloud_sync/telemetry/ does it).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, cast

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite

from cloud_sync.store.database import Database
from cloud_sync.store.schema import devices, metadata
from cloud_sync.telemetry import validation  # the module: it imports this package, so it may be half-made here
from cloud_sync.telemetry.rollup import DeviceWindows, ModelWindow, combine_device_windows
from edgefleet.proto.edgefleet.v1.telemetry_pb2 import Telemetry

__all__ = [
    "DevicePresence",
    "LatestTelemetry",
    "StatusReceived",
    "TelemetryReceived",
    "TelemetryStore",
    "device_presence",
    "model_telemetry",
    "telemetry_latest",
]

# The largest IN (...) list one statement carries; longer device lists are queried in chunks.
_IN_CHUNK = 1000

# One row per device: the fields of its newest telemetry message, and the message itself (for the per-model
# detail). "Newest": within one agent run (one agent_start_ms) the higher seq, so a late duplicate or a
# replica's slower write never replaces a newer row; between runs the one received last. Not the device's
# clock: a message stamped 2**62 (a broken clock) would stay the "latest" forever.
telemetry_latest = sa.Table(
    "telemetry_latest",
    metadata,
    sa.Column("device_id", sa.Text, primary_key=True),
    sa.Column("timestamp_ms", sa.BigInteger, nullable=False),
    sa.Column("window_s", sa.Float, nullable=False),
    sa.Column("seq", sa.BigInteger, nullable=False),
    sa.Column("agent_start_ms", sa.BigInteger, nullable=False),
    sa.Column("received_at_ms", sa.BigInteger, nullable=False),
    sa.Column("models", sa.Integer, nullable=False),
    sa.Column("outbox_depth", sa.BigInteger, nullable=False),
    sa.Column("outbox_bytes", sa.BigInteger, nullable=False),
    sa.Column("outbox_produced_total", sa.BigInteger, nullable=False),
    sa.Column("outbox_evicted_total", sa.BigInteger, nullable=False),
    sa.Column("outbox_acked_seq", sa.BigInteger, nullable=False),
    sa.Column("upload_lag_s", sa.Float, nullable=False),
    sa.Column("cpu_percent", sa.Float, nullable=False),
    sa.Column("memory_used_bytes", sa.BigInteger, nullable=False),
    sa.Column("memory_total_bytes", sa.BigInteger, nullable=False),
    sa.Column("gpu_percent", sa.Float, nullable=False),
    sa.Column("temperature_c", sa.Float, nullable=False),
    sa.Column("power_w", sa.Float, nullable=False),
    sa.Column("payload", sa.LargeBinary, nullable=False),
)

model_telemetry = sa.Table(
    "model_telemetry",
    metadata,
    sa.Column("device_id", sa.Text, nullable=False),
    sa.Column("model", sa.Text, nullable=False),
    # uint32 in the proto: past PostgreSQL's signed INTEGER.
    sa.Column("version", sa.BigInteger, nullable=False),
    sa.Column("window_end_ms", sa.BigInteger, nullable=False),
    sa.Column("window_s", sa.Float, nullable=False),
    sa.Column("role", sa.SmallInteger, nullable=False),
    sa.Column("requests", sa.BigInteger, nullable=False),
    sa.Column("errors", sa.BigInteger, nullable=False),
    sa.Column("inferences", sa.BigInteger, nullable=False),
    sa.Column("p50_ms", sa.Float, nullable=False),
    sa.Column("p95_ms", sa.Float, nullable=False),
    sa.Column("p99_ms", sa.Float, nullable=False),
    sa.Column("mean_batch_size", sa.Float, nullable=False),
    sa.Column("queue_depth", sa.BigInteger, nullable=False),
    sa.Column("shadow_compared", sa.BigInteger, nullable=False),
    sa.Column("shadow_agreed", sa.BigInteger, nullable=False),
    sa.Column("cpu_seconds", sa.Float, nullable=False),
    sa.Column("energy_joules", sa.Float, nullable=False),
    sa.Column("received_at_ms", sa.BigInteger, nullable=False),
    sa.PrimaryKeyConstraint("device_id", "model", "version", "window_end_ms"),
    # model_window(): one version's windows since a time, across devices.
    sa.Index(None, "model", "version", "window_end_ms"),
)

device_presence = sa.Table(
    "device_presence",
    metadata,
    sa.Column("device_id", sa.Text, primary_key=True),
    sa.Column("online", sa.Boolean, nullable=False),
    # When `online` last changed (as the cloud received it).
    sa.Column("since_ms", sa.BigInteger, nullable=False),
    # The last status or telemetry message received from the device.
    sa.Column("last_seen_ms", sa.BigInteger, nullable=False),
)


@dataclass(frozen=True)
class TelemetryReceived:
    """A validated Telemetry message from a registered device (its id is the topic's)."""

    device_id: str
    message: Telemetry
    payload: bytes
    received_at_ms: int


@dataclass(frozen=True)
class StatusReceived:
    """A presence message: the device's `online` on connect, `offline` on a clean close or as its last will.

    `retained`: the broker's stored copy, handed over when cloud-sync subscribed (Mosquitto does so even
    for shared subscriptions): the device's current state, but not a sign of life now.
    """

    device_id: str
    online: bool
    received_at_ms: int
    retained: bool = False


@dataclass(frozen=True)
class DevicePresence:
    device_id: str
    online: bool
    since_ms: int
    last_seen_ms: int


@dataclass(frozen=True)
class LatestTelemetry:
    device_id: str
    message: Telemetry
    received_at_ms: int


def _insert(backend: str, table: sa.Table) -> postgresql.Insert | sqlite.Insert:
    return postgresql.insert(table) if backend == "postgresql" else sqlite.insert(table)


def _latest_row(item: TelemetryReceived) -> dict[str, object]:
    m = item.message
    return {
        "device_id": item.device_id,
        "timestamp_ms": m.timestamp_ms,
        "window_s": m.window_s,
        "seq": m.seq,
        "agent_start_ms": m.agent_start_ms,
        "received_at_ms": item.received_at_ms,
        "models": len(m.models),
        "outbox_depth": m.outbox.depth,
        "outbox_bytes": m.outbox.bytes,
        "outbox_produced_total": m.outbox.produced_total,
        "outbox_evicted_total": m.outbox.evicted_total,
        "outbox_acked_seq": m.outbox.acked_seq,
        "upload_lag_s": m.outbox.upload_lag_s,
        "cpu_percent": m.system.cpu_percent,
        "memory_used_bytes": m.system.memory_used_bytes,
        "memory_total_bytes": m.system.memory_total_bytes,
        "gpu_percent": m.system.gpu_percent,
        "temperature_c": m.system.temperature_c,
        "power_w": m.system.power_w,
        "payload": item.payload,
    }


def _model_rows(item: TelemetryReceived) -> list[tuple[object, ...]]:
    """model_telemetry rows as tuples in MODEL_COLUMNS order."""
    m = item.message
    end, window, device, at = (
        validation.window_end_ms(m.timestamp_ms, item.received_at_ms),
        m.window_s,
        item.device_id,
        item.received_at_ms,
    )
    return [
        (
            device,
            v.name,
            v.version,
            end,
            window,
            v.role,
            v.requests,
            v.errors,
            v.inferences,
            v.latency.p50_ms,
            v.latency.p95_ms,
            v.latency.p99_ms,
            v.mean_batch_size,
            v.queue_depth,
            v.shadow_compared,
            v.shadow_agreed,
            v.cpu_seconds,
            v.energy_joules,
            at,
        )
        for v in m.models
    ]


_MODEL_COLUMNS = (
    "device_id",
    "model",
    "version",
    "window_end_ms",
    "window_s",
    "role",
    "requests",
    "errors",
    "inferences",
    "p50_ms",
    "p95_ms",
    "p99_ms",
    "mean_batch_size",
    "queue_depth",
    "shadow_compared",
    "shadow_agreed",
    "cpu_seconds",
    "energy_joules",
    "received_at_ms",
)


@functools.cache
def _model_insert_sql(backend: str) -> str:
    """INSERT ... ON CONFLICT DO NOTHING for model_telemetry, compiled once, for an executemany of plain tuples
    straight to the driver (as results.py does): SQLAlchemy's per-row parameter processing cost more than
    the insert itself (measured: 42 us a message with two versions, most of it in construct_params)."""
    dialect_class = cast("Callable[..., sa.Dialect]", sa.make_url(f"{backend}://").get_dialect())
    dialect = dialect_class(paramstyle="qmark" if backend == "sqlite" else "format")
    insert = sqlite.insert(model_telemetry) if backend == "sqlite" else postgresql.insert(model_telemetry)
    compiled = insert.on_conflict_do_nothing().compile(dialect=dialect, column_keys=list(_MODEL_COLUMNS))
    if tuple(compiled.positiontup or ()) != _MODEL_COLUMNS:
        raise AssertionError(f"model_telemetry parameters out of order: {compiled.positiontup}")
    return str(compiled)


def _newest_per_device(items: Iterable[TelemetryReceived]) -> list[TelemetryReceived]:
    """The newest of each device's messages in `items` (in arrival order), as telemetry_latest decides."""
    newest: dict[str, TelemetryReceived] = {}
    for item in items:
        kept = newest.get(item.device_id)
        if (
            kept is None
            or item.message.agent_start_ms != kept.message.agent_start_ms
            or item.message.seq > kept.message.seq
        ):
            newest[item.device_id] = item
    return list(newest.values())


class TelemetryStore:
    """Telemetry and presence over a Database. Thread-safe; synchronous (call it off the event loop)."""

    def __init__(self, db: Database) -> None:
        self._db = db

    def write(self, items: Sequence[TelemetryReceived | StatusReceived]) -> None:
        """Store a batch of received messages in one transaction, in the order they arrived."""
        if items:
            self._db.write(lambda conn: _write(conn, items))

    def registered_devices(self) -> frozenset[str]:
        """The ids of every registered device that is not revoked."""
        query = sa.select(devices.c.device_id).where(devices.c.revoked_at_ms.is_(None))
        return frozenset(self._db.read(lambda conn: conn.execute(query).scalars().all()))

    def fleet_presence(self) -> list[DevicePresence]:
        """Every device that ever reported, ordered by id."""
        query = sa.select(device_presence).order_by(device_presence.c.device_id)
        rows = self._db.read(lambda conn: conn.execute(query).all())
        return [DevicePresence(r.device_id, bool(r.online), r.since_ms, r.last_seen_ms) for r in rows]

    def online_count(self) -> tuple[int, int]:
        """(online, offline) devices among those that ever reported."""
        query = sa.select(device_presence.c.online, sa.func.count()).group_by(device_presence.c.online)
        counts = {bool(online): n for online, n in self._db.read(lambda conn: conn.execute(query).all())}
        return counts.get(True, 0), counts.get(False, 0)

    def latest(self, device_id: str) -> LatestTelemetry | None:
        """The newest telemetry stored for `device_id`, or None."""
        query = sa.select(telemetry_latest.c.payload, telemetry_latest.c.received_at_ms).where(
            telemetry_latest.c.device_id == device_id
        )
        row = self._db.read(lambda conn: conn.execute(query).one_or_none())
        if row is None:
            return None
        return LatestTelemetry(device_id, Telemetry.FromString(bytes(row.payload)), row.received_at_ms)

    def model_window(self, model: str, version: int, device_ids: Iterable[str] | None, since_ms: int) -> ModelWindow:
        """How `model` `version` did on `device_ids` (None: every device) in windows ending after `since_ms`.

        See cloud_sync.telemetry.rollup.ModelWindow for how devices combine (p99 especially).
        """
        ids = None if device_ids is None else sorted(set(device_ids))
        if ids is not None and not ids:
            return combine_device_windows(model, version, [])

        def query(conn: sa.Connection) -> list[DeviceWindows]:
            if ids is None:
                return _device_windows(conn, model, version, since_ms, None)
            found: list[DeviceWindows] = []
            for start in range(0, len(ids), _IN_CHUNK):
                found += _device_windows(conn, model, version, since_ms, ids[start : start + _IN_CHUNK])
            return found

        return combine_device_windows(model, version, self._db.read(query))

    def model_windows(self, since_ms: int) -> list[ModelWindow]:
        """Every model version's window since `since_ms`, across all devices (for fleet metrics)."""

        def query(conn: sa.Connection) -> dict[tuple[str, int], list[DeviceWindows]]:
            grouped: dict[tuple[str, int], list[DeviceWindows]] = {}
            for key, windows in _grouped_device_windows(conn, since_ms):
                grouped.setdefault(key, []).append(windows)
            return grouped

        grouped = self._db.read(query)
        return [combine_device_windows(model, version, found) for (model, version), found in sorted(grouped.items())]


def _write(conn: sa.Connection, items: Sequence[TelemetryReceived | StatusReceived]) -> None:
    backend = conn.dialect.name
    telemetry = [i for i in items if isinstance(i, TelemetryReceived)]
    if telemetry:
        model_rows = [row for item in telemetry for row in _model_rows(item)]
        if model_rows:
            # A redelivered message (QoS 1) carries the same rows: the first copy stays.
            conn.exec_driver_sql(_model_insert_sql(backend), model_rows)
        conn.execute(_latest_upsert(backend), [_latest_row(item) for item in _newest_per_device(telemetry)])
        # A device that sends telemetry is connected: it appears online if it was never seen (cloud-sync
        # started after its `online`, and the broker follows MQTT 5 in not handing retained messages to shared
        # subscriptions). Telemetry never turns an `offline` back online: that takes the device's next `online`.
        seen: dict[str, int] = {}
        for received in telemetry:
            seen[received.device_id] = max(seen.get(received.device_id, 0), received.received_at_ms)
        conn.execute(
            _seen_upsert(backend),
            [{"device_id": d, "online": True, "since_ms": at, "last_seen_ms": at} for d, at in seen.items()],
        )
    for status in items:
        if isinstance(status, StatusReceived):
            conn.execute(
                _presence_upsert(backend, status.retained),
                {
                    "device_id": status.device_id,
                    "online": status.online,
                    "since_ms": status.received_at_ms,
                    "last_seen_ms": status.received_at_ms,
                },
            )


# The upserts below are built once per backend: building one costs about a millisecond of SQLAlchemy work.


@functools.cache
def _latest_upsert(backend: str) -> sa.Executable:
    insert = _insert(backend, telemetry_latest)
    t, ex = telemetry_latest.c, insert.excluded
    newer = ((ex.agent_start_ms == t.agent_start_ms) & (ex.seq > t.seq)) | (
        (ex.agent_start_ms != t.agent_start_ms) & (ex.received_at_ms >= t.received_at_ms)
    )
    return insert.on_conflict_do_update(
        index_elements=[t.device_id],
        set_={c.name: ex[c.name] for c in telemetry_latest.columns if c.name != "device_id"},
        where=newer,
    )


@functools.cache
def _seen_upsert(backend: str) -> sa.Executable:
    insert = _insert(backend, device_presence)
    p, ex = device_presence.c, insert.excluded
    return insert.on_conflict_do_update(
        index_elements=[p.device_id],
        set_={"last_seen_ms": sa.case((ex.last_seen_ms > p.last_seen_ms, ex.last_seen_ms), else_=p.last_seen_ms)},
    )


@functools.cache
def _presence_upsert(backend: str, retained: bool) -> sa.Executable:
    insert = _insert(backend, device_presence)
    p, ex = device_presence.c, insert.excluded
    return insert.on_conflict_do_update(
        index_elements=[p.device_id],
        set_={
            "online": ex.online,
            "since_ms": sa.case((p.online == ex.online, p.since_ms), else_=ex.since_ms),
            # A retained status is the state the broker kept, not a sign of life now.
            "last_seen_ms": p.last_seen_ms
            if retained
            else sa.case((ex.last_seen_ms > p.last_seen_ms, ex.last_seen_ms), else_=p.last_seen_ms),
        },
    )


def _aggregates() -> list[sa.ColumnElement[Any]]:
    m = model_telemetry.c
    # Batches run = inferences / mean batch size, per window (the message carries the mean, not the count).
    executions = sa.case((m.mean_batch_size > 0, m.inferences / m.mean_batch_size), else_=0.0)
    return [
        sa.func.count().label("windows"),
        sa.func.sum(m.window_s).label("window_s"),
        sa.func.sum(m.requests).label("requests"),
        sa.func.sum(m.errors).label("errors"),
        sa.func.sum(m.inferences).label("inferences"),
        sa.func.sum(executions).label("executions"),
        sa.func.sum(m.requests * m.p99_ms).label("p99_request_ms"),
        sa.func.max(m.p99_ms).label("p99_max_ms"),
        sa.func.sum(m.cpu_seconds).label("cpu_seconds"),
        sa.func.sum(m.energy_joules).label("energy_joules"),
        sa.func.sum(m.shadow_compared).label("shadow_compared"),
        sa.func.sum(m.shadow_agreed).label("shadow_agreed"),
    ]


def _windows(row: sa.Row[tuple[object, ...]]) -> DeviceWindows:
    r = row._mapping
    return DeviceWindows(
        device_id=str(r["device_id"]),
        windows=int(r["windows"]),
        window_s=float(r["window_s"] or 0.0),
        requests=int(r["requests"] or 0),
        errors=int(r["errors"] or 0),
        inferences=int(r["inferences"] or 0),
        executions=float(r["executions"] or 0.0),
        p99_request_ms=float(r["p99_request_ms"] or 0.0),
        p99_max_ms=float(r["p99_max_ms"] or 0.0),
        cpu_seconds=float(r["cpu_seconds"] or 0.0),
        energy_joules=float(r["energy_joules"] or 0.0),
        shadow_compared=int(r["shadow_compared"] or 0),
        shadow_agreed=int(r["shadow_agreed"] or 0),
    )


def _device_windows(
    conn: sa.Connection, model: str, version: int, since_ms: int, ids: Sequence[str] | None
) -> list[DeviceWindows]:
    m = model_telemetry.c
    query = (
        sa.select(m.device_id, *_aggregates())
        .where(m.model == model, m.version == version, m.window_end_ms > since_ms)
        .group_by(m.device_id)
    )
    if ids is not None:
        query = query.where(m.device_id.in_(ids))
    return [_windows(row) for row in conn.execute(query)]


def _grouped_device_windows(conn: sa.Connection, since_ms: int) -> list[tuple[tuple[str, int], DeviceWindows]]:
    m = model_telemetry.c
    query = (
        sa.select(m.model, m.version, m.device_id, *_aggregates())
        .where(m.window_end_ms > since_ms)
        .group_by(m.model, m.version, m.device_id)
    )
    return [((row.model, int(row.version)), _windows(row)) for row in conn.execute(query)]
