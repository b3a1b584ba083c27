"""The rollout controller over a real store: telemetry and reported states in, gate verdicts acted on; and
with two replicas on one PostgreSQL database, exactly one steps and the other takes over when it goes."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import sqlalchemy as sa

from cloud_sync.reconciler import Reconciler
from cloud_sync.rollouts.controller import RolloutController, lock_key
from cloud_sync.rollouts.plan import Rollout
from cloud_sync.rollouts.service import RolloutService
from cloud_sync.rollouts.store import RolloutStore
from cloud_sync.store import Database, DeviceRegistry, TelemetryStore, open_database
from cloud_sync.store.assignments import AssignmentStore
from cloud_sync.store.control import ControlStore
from cloud_sync.store.database import now_ms
from cloud_sync.store.policies import PolicyStore
from cloud_sync.store.telemetry import TelemetryReceived
from edgefleet.proto.edgefleet.v1.state_pb2 import ModelRole, ModelState, ModelStatus, ReportedState
from edgefleet.proto.edgefleet.v1.telemetry_pb2 import LatencySummary, ModelVersionTelemetry, Telemetry
from tests.cloud_sync.desired.conftest import Catalog
from tests.cloud_sync.rollouts.conftest import fleet, runs

GATES = "max_error_rate=0.05,max_p99_ratio=2,min_shadow_agreement=0.9,min_devices=1,min_requests=10"
_seq = iter(range(1, 10**9))


def send(
    telemetry: TelemetryStore,
    device_id: str,
    version: int,
    *,
    requests: int = 100,
    errors: int = 0,
    p99_ms: float = 10.0,
    role: int = ModelRole.MODEL_ROLE_ACTIVE,
    agreed: int | None = None,
) -> None:
    """One telemetry window of digits `version` from `device_id`, ending now."""
    at = now_ms() + 1
    compared = requests if role == ModelRole.MODEL_ROLE_SHADOW else 0
    model = ModelVersionTelemetry(
        name="digits",
        version=version,
        role=role,  # type: ignore[arg-type]
        requests=requests,
        errors=errors,
        inferences=requests,
        latency=LatencySummary(p50_ms=p99_ms / 2, p95_ms=p99_ms, p99_ms=p99_ms),
        mean_batch_size=1.0,
        shadow_compared=compared,
        shadow_agreed=compared if agreed is None else agreed,
    )
    message = Telemetry(device_id=device_id, timestamp_ms=at, window_s=10.0, seq=next(_seq), agent_start_ms=1)
    message.models.append(model)
    telemetry.write([TelemetryReceived(device_id, message, message.SerializeToString(), at)])


@pytest.fixture
def telemetry(db: Database) -> TelemetryStore:
    return TelemetryStore(db)


@pytest.fixture
def controller(service: RolloutService, control: ControlStore) -> Iterator[RolloutController]:
    running = RolloutController(service, control, tick_s=0.1)
    yield running
    running.close()


def serve_stage(service: RolloutService, telemetry: TelemetryStore, rollout: Rollout, **b: object) -> None:
    """Every device of the current stage reports A and B as the stage runs them (B as `b` says)."""
    for device_id in service.stage_devices(rollout):
        if rollout.stage.mode == "shadow":
            send(telemetry, device_id, rollout.from_version)
            send(telemetry, device_id, rollout.to_version, role=ModelRole.MODEL_ROLE_SHADOW, **b)  # type: ignore[arg-type]
        else:
            send(telemetry, device_id, rollout.to_version, **b)  # type: ignore[arg-type]


def test_a_good_candidate_goes_through_every_stage_on_its_figures(
    service: RolloutService,
    controller: RolloutController,
    telemetry: TelemetryStore,
    devices: DeviceRegistry,
    assignments: AssignmentStore,
    control: ControlStore,
) -> None:
    ids = fleet(devices, assignments, 10)
    for device_id in ids:  # A's figures from before the rollout, for the p99 ratio of active stages
        send(telemetry, device_id, 1, p99_ms=10.0)
    rollout = service.create("digits", 2, {}, "shadow:10%,active:10%,active:50%,active:100%", GATES)
    [waiting] = controller.tick()
    assert (waiting.decision, waiting.reason) == ("wait", "waiting for min_devices: 0 of 1")
    for stage in range(4):
        current = service.get(rollout.id)
        assert current.stage_index == stage and current.state == "running"
        serve_stage(service, telemetry, current, p99_ms=12.0)
        [step] = controller.tick()
        assert step.decision == "advance", step.reason
    done = service.get(rollout.id)
    assert done.state == "completed"
    assert all(runs(control, d) == [(2, "active", "")] for d in ids)
    events = service.events(rollout.id)
    assert [(e.kind, e.actor) for e in events] == [("created", "operator")] + [("advanced", "gate")] * 4 + [
        ("completed", "gate")
    ]
    shadow_step = events[1].values["gates"]
    assert shadow_step["min_shadow_agreement"] == {"value": 1.0, "threshold": 0.9, "ok": True}
    assert events[2].values["gates"]["max_p99_ratio"] == {"value": pytest.approx(1.2), "threshold": 2.0, "ok": True}
    assert done.last_evaluation is not None and done.last_evaluation["decision"] == "advance"


@pytest.mark.parametrize(
    ("stages", "bad", "gate"),
    [
        ("active:10%:1h,active:100%", {"errors": 50}, "max_error_rate"),
        ("active:10%:1h,active:100%", {"p99_ms": 80.0}, "max_p99_ratio"),
        ("shadow:10%:1h,active:100%", {"agreed": 10}, "min_shadow_agreement"),
    ],
)
def test_a_bad_candidate_is_stopped_in_stage_1_by_its_gate_and_every_device_goes_back_to_a(
    service: RolloutService,
    controller: RolloutController,
    telemetry: TelemetryStore,
    devices: DeviceRegistry,
    assignments: AssignmentStore,
    control: ControlStore,
    stages: str,
    bad: dict[str, object],
    gate: str,
) -> None:
    ids = fleet(devices, assignments, 20)
    for device_id in ids:
        send(telemetry, device_id, 1, p99_ms=10.0)
    rollout = service.create("digits", 3, {}, stages, GATES)
    touched = service.stage_devices(rollout)
    assert len(touched) == 2 and all(runs(control, d)[-1][0] == 3 for d in touched)
    serve_stage(service, telemetry, rollout, **bad)
    [step] = controller.tick()  # long before the bake time is over
    assert step.decision == "abort" and gate in step.reason
    aborted = service.get(rollout.id)
    assert aborted.state == "aborted" and gate in aborted.reason
    assert all(runs(control, d) == [(1, "active", "")] for d in ids)
    failed, ended = service.events(rollout.id)[-2:]
    assert (failed.kind, failed.actor, failed.values["gate"]) == ("gate_failed", "gate", gate)
    assert ended.kind == "aborted" and ended.values["gates"][gate]["ok"] is False
    assert controller.tick() == []  # nothing running any more


def test_a_candidate_that_fails_to_load_aborts_on_the_reported_state(
    service: RolloutService,
    controller: RolloutController,
    devices: DeviceRegistry,
    assignments: AssignmentStore,
    control: ControlStore,
) -> None:
    fleet(devices, assignments, 10)
    rollout = service.create("digits", 3, {}, "active:10%:1h,active:100%", GATES)
    [device_id] = service.stage_devices(rollout)
    desired = control.desired(device_id)
    assert desired is not None
    report = ReportedState(device_id=device_id, generation=desired.generation, reported_at_ms=now_ms())
    # First the link's failure (the cloud was away mid-download): no fault of the candidate, nothing decided.
    report.models.append(
        ModelStatus(
            name="digits",
            version=3,
            role=ModelRole.MODEL_ROLE_ACTIVE,
            state=ModelState.MODEL_STATE_FAILED,
            reason="digits:3 model.onnx: UNAVAILABLE: Cancelling all calls",
        )
    )
    control.report(device_id, report)
    [step] = controller.tick()
    assert step.decision != "abort"
    assert service.get(rollout.id).last_evaluation["values"]["max_apply_failures"]["value"] == 0
    # Then the package's own: it does not load.
    report.models[0].reason, report.models[0].package_fault = "onnx load failed", True
    control.report(device_id, report)
    [step] = controller.tick()
    assert step.decision == "abort" and "max_apply_failures" in step.reason
    assert runs(control, device_id) == [(1, "active", "")]


def test_a_paused_rollout_is_left_alone_by_the_gates(
    service: RolloutService,
    controller: RolloutController,
    telemetry: TelemetryStore,
    devices: DeviceRegistry,
    assignments: AssignmentStore,
) -> None:
    fleet(devices, assignments, 10)
    rollout = service.create("digits", 3, {}, "active:10%,active:100%", GATES)
    serve_stage(service, telemetry, rollout, errors=90)
    service.pause(rollout.id, reason="investigating")
    assert controller.tick() == []
    assert service.get(rollout.id).state == "paused"


@pytest.fixture
def replicas(postgres_url: str) -> Iterator[list[tuple[Database, RolloutService, RolloutController]]]:
    """Two cloud-sync-like replicas (a database connection pool, service and controller each) on one schema."""
    made: list[tuple[Database, RolloutService, RolloutController]] = []
    catalog = Catalog({("digits", 1): "a" * 64, ("digits", 2): "b" * 64})
    try:
        for _ in range(2):
            db = open_database(postgres_url)
            devices, assignments, control = DeviceRegistry(db), AssignmentStore(db), ControlStore(db)
            reconciler = Reconciler(devices, assignments, PolicyStore(db), catalog, control, RolloutStore(db))
            service = RolloutService(db, reconciler, assignments, catalog, devices)
            made.append((db, service, RolloutController(service, control, tick_s=0.1)))
        yield made
    finally:
        for db, _, controller in made:
            controller.close()
            db.close()


def kill_leader(db: Database) -> int:
    """End the database session holding the controller's lock in `db`'s schema (as a killed replica's ends)."""
    with db.engine.connect() as conn:
        key = lock_key(conn.execute(sa.text("SELECT current_schema()")).scalar_one())
        query = sa.text(
            "SELECT pg_terminate_backend(pid) FROM pg_locks WHERE locktype = 'advisory' AND granted "
            "AND database = (SELECT oid FROM pg_database WHERE datname = current_database()) "
            "AND classid = :high AND objid = :low AND objsubid = 1"
        )
        unsigned = key % 2**64
        killed = conn.execute(query, {"high": unsigned >> 32, "low": unsigned & 0xFFFFFFFF}).all()
        conn.commit()
    return len(killed)


def test_two_replicas_on_postgresql_one_steps_and_the_other_takes_over_when_it_goes(
    replicas: list[tuple[Database, RolloutService, RolloutController]],
) -> None:
    (db, service, first), (_, service2, second) = replicas
    fleet(DeviceRegistry(db), AssignmentStore(db), 4)
    rollout = service.create("digits", 2, {}, "active:25%,active:50%,active:75%,active:100%", GATES)
    telemetry = TelemetryStore(db)
    serve_stage(service, telemetry, rollout)
    assert [s.decision for s in first.step() or []] == ["advance"]
    assert second.step() is None  # the first replica leads: the second one does nothing
    assert second.step() is None
    serve_stage(service, telemetry, service.get(rollout.id))
    first.close()  # the leader goes away (its session, and the lock with it)
    assert [s.decision for s in second.step() or []] == ["advance"]
    assert first.step() is None  # back, it finds the lead taken
    # A leader whose database session is killed (its replica died) loses the lead; the other one takes it.
    assert kill_leader(db) == 1
    assert second.step() is None
    serve_stage(service, telemetry, service.get(rollout.id))
    assert [s.decision for s in first.step() or []] == ["advance"]
    stages = [e.stage_index for e in service2.events(rollout.id) if e.kind == "advanced"]
    assert stages == [1, 2, 3]  # each stage stepped into exactly once
    assert service2.get(rollout.id).stage_index == 3
