"""The rollout controller: a thin loop that gathers each running rollout's stage figures and acts on the gates.

One replica leads at a time (a PostgreSQL session advisory lock held on a dedicated connection; on SQLite the
process is the only writer and always leads), and every step is a checked transition, so a step is never
taken twice. The decisions themselves are gates.py's. Not the transitions (service.py).
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Iterable
from concurrent.futures import Executor
from dataclasses import dataclass

import sqlalchemy as sa
import structlog

from cloud_sync.errors import CloudSyncError, FailedPrecondition, NotFound
from cloud_sync.rollouts.gates import DeviceMetrics, Verdict, VersionMetrics, evaluate, is_fallback
from cloud_sync.rollouts.plan import Rollout
from cloud_sync.rollouts.service import RolloutService
from cloud_sync.store.control import ControlStore
from cloud_sync.store.database import Database, now_ms
from cloud_sync.store.telemetry import model_telemetry
from edgefleet.proto.edgefleet.v1.state_pb2 import ModelState

__all__ = ["A_LOOKBACK_MS", "TICK_S", "Leadership", "RolloutController", "lock_key"]

log = structlog.get_logger(__name__)

TICK_S = 2.0
# In an active stage A no longer runs on the stage's devices: its figures come from the windows before the
# stage began, this far back.
A_LOOKBACK_MS = 10 * 60 * 1000
_IN_CHUNK = 1000


class Leadership:
    """Whether this replica runs the controller: on PostgreSQL whoever holds the rollouts' session advisory
    lock (its connection's end, a killed replica's too, releases it); on SQLite always."""

    def __init__(self, db: Database) -> None:
        self._db = db
        self._conn: sa.Connection | None = None

    @property
    def leading(self) -> bool:
        return self._db.backend == "sqlite" or self._conn is not None

    def lead(self) -> bool:
        """Take the lead if free, or check it is still held (False: another replica leads, or the link died)."""
        if self._db.backend == "sqlite":
            return True
        try:
            if self._conn is not None:
                self._conn.execute(sa.text("SELECT 1"))
                self._conn.rollback()  # never idle in a transaction while leading
                return True
            conn = self._db.engine.connect()
            try:
                key = lock_key(conn.execute(sa.text("SELECT current_schema()")).scalar_one())
                taken = bool(conn.execute(sa.select(sa.func.pg_try_advisory_lock(key))).scalar_one())
                conn.commit()  # no transaction left open on the lock's connection
            except BaseException:
                conn.close()
                raise
            if not taken:
                conn.close()
                return False
            self._conn = conn
            log.info("rollouts.leading")
            return True
        except sa.exc.SQLAlchemyError as exc:
            log.warning("rollouts.lead_lost", error=str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
            self.release()
            return False

    def release(self) -> None:
        """Give the lead up (closing the connection ends the session and with it the lock)."""
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                conn.invalidate()  # never back to the pool: the session (and its lock) must end
                conn.close()
            except sa.exc.SQLAlchemyError:
                pass


def lock_key(schema: str | None) -> int:
    """The advisory lock key of the rollout controller of the cloud store in `schema`."""
    # Advisory locks are per database; the key includes the schema so installations in schemas of one
    # database (and parallel test runs) each have their own controller.
    digest = hashlib.sha256(f"edgefleet-rollouts/{schema}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


def _version_windows(
    db: Database, model: str, version: int, device_ids: list[str], since_ms: int
) -> dict[str, VersionMetrics]:
    """Per device: `model` `version`'s windows ending after `since_ms`, summed (p99 request-weighted)."""
    m = model_telemetry.c
    columns = (
        m.device_id,
        sa.func.sum(m.requests).label("requests"),
        sa.func.sum(m.errors).label("errors"),
        sa.func.sum(m.requests * m.p99_ms).label("p99_request_ms"),
        sa.func.sum(m.shadow_compared).label("compared"),
        sa.func.sum(m.shadow_agreed).label("agreed"),
    )

    def read(conn: sa.Connection) -> dict[str, VersionMetrics]:
        found: dict[str, VersionMetrics] = {}
        for start in range(0, len(device_ids), _IN_CHUNK):
            query = (
                sa.select(*columns)
                .where(m.model == model, m.version == version, m.window_end_ms > since_ms)
                .where(m.device_id.in_(device_ids[start : start + _IN_CHUNK]))
                .group_by(m.device_id)
            )
            for r in conn.execute(query):
                requests = int(r.requests or 0)
                found[r.device_id] = VersionMetrics(
                    requests=requests,
                    errors=int(r.errors or 0),
                    p99_ms=float(r.p99_request_ms or 0.0) / requests if requests else 0.0,
                    shadow_compared=int(r.compared or 0),
                    shadow_agreed=int(r.agreed or 0),
                )
        return found

    return db.read(read) if device_ids else {}


@dataclass(frozen=True)
class Step:
    """What one tick did with one rollout."""

    rollout_id: str
    stage_index: int
    decision: str
    reason: str


class RolloutController:
    """Moves running rollouts on their gates. `tick` is one pass (synchronous); `run` loops while leading."""

    def __init__(self, service: RolloutService, control: ControlStore, tick_s: float = TICK_S) -> None:
        self._service = service
        self._control = control
        self.tick_s = tick_s
        self.leadership = Leadership(service.db)

    def step(self) -> list[Step] | None:
        """A tick if this replica leads (None if another one does)."""
        return self.tick() if self.leadership.lead() else None

    def tick(self, at_ms: int | None = None) -> list[Step]:
        """Evaluate every running rollout once and act on its verdict; returns what was done."""
        steps = []
        for rollout in self._service.list("running"):
            try:
                steps.append(self._evaluate(rollout, now_ms() if at_ms is None else at_ms))
            except (FailedPrecondition, NotFound) as exc:  # moved meanwhile (an operator): the next tick sees it
                log.info("rollouts.moved_meanwhile", rollout=rollout.id, detail=exc.message)
        return steps

    def stage_metrics(self, rollout: Rollout) -> list[DeviceMetrics]:
        """The current stage's devices with A's and B's figures and what their reported states say of B."""
        devices = self._service.stage_devices(rollout)
        since = rollout.stage_started_at_ms
        a_since = since if rollout.stage.mode == "shadow" else since - A_LOOKBACK_MS
        db = self._service.db
        a = _version_windows(db, rollout.model, rollout.from_version, devices, a_since)
        b = _version_windows(db, rollout.model, rollout.to_version, devices, since)
        failed, fallback = self._reported(rollout, devices)
        return [DeviceMetrics(d, a.get(d), b.get(d), d in failed, d in fallback) for d in devices]

    def _reported(self, rollout: Rollout, devices: Iterable[str]) -> tuple[set[str], set[str]]:
        failed: set[str] = set()
        fallback: set[str] = set()
        for device_id, report in self._control.reported_many(devices).items():
            for m in report.state.models:
                if m.name != rollout.model or m.version != rollout.to_version:
                    continue
                # The package's own failure only: a download the cloud's restart cut is no fault of the candidate.
                if m.state == ModelState.MODEL_STATE_FAILED and m.package_fault:
                    failed.add(device_id)
                elif is_fallback(m.reason):
                    fallback.add(device_id)
        return failed, fallback

    def _evaluate(self, rollout: Rollout, at_ms: int) -> Step:
        metrics = self.stage_metrics(rollout)
        bake_elapsed = at_ms - rollout.stage_started_at_ms >= rollout.stage.bake_s * 1000
        verdict = evaluate(rollout.gates, rollout.stage.mode, metrics, bake_elapsed)
        evaluation = {**verdict.to_json(), "at_ms": at_ms, "stage_index": rollout.stage_index, "devices": len(metrics)}
        self._service.record_evaluation(rollout, evaluation)
        self._act(rollout, verdict)
        return Step(rollout.id, rollout.stage_index, verdict.decision, verdict.reason)

    def _act(self, rollout: Rollout, verdict: Verdict) -> None:
        values = {"stage": rollout.stage.text(), "gates": verdict.values}
        if verdict.decision == "abort":
            self._service.abort_seen(rollout, "gate", verdict.reason, values, failed_gate=verdict.failed_gate)
            log.warning("rollouts.aborted", rollout=rollout.id, stage=rollout.stage_index, reason=verdict.reason)
        elif verdict.decision == "advance":
            self._service.advance_seen(rollout, "gate", verdict.reason, values)

    async def run(self, executor: Executor) -> None:
        """Until cancelled: every tick_s, a tick on `executor` while this replica leads (errors logged).

        Call `close` (off the loop) afterwards to give the lead up at once."""
        loop = asyncio.get_running_loop()
        while True:
            try:
                await loop.run_in_executor(executor, self.step)
            except CloudSyncError as exc:
                log.warning("rollouts.tick_failed", error=exc.message)
            except Exception as exc:  # a bug: logged, and the next tick tries again
                log.error("rollouts.tick_crashed", error=f"{type(exc).__name__}: {exc}")
            await asyncio.sleep(self.tick_s)

    def close(self) -> None:
        """Give the lead up (another replica takes it on its next tick)."""
        self.leadership.release()
