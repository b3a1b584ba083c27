"""Gate decisions of a running cloud-sync's rollout controller land in the audit log: an abort by a breached
gate as `gate:<gate>` with the gate's value and threshold, an advance and a completion as `controller`.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from cloud_sync.config import RolloutsSection
from cloud_sync.rollouts.service import RolloutService
from cloud_sync.store import AuditLog, Database, TelemetryStore, open_database
from tests.cloud_inprocess import InProcessCloud
from tests.cloud_sync.registry.helpers import FAR_FUTURE_MS, package
from tests.cloud_sync.rollouts.test_controller import send
from tests.waiting import wait_for


@pytest.fixture
def cloud(tmp_path: Path) -> Iterator[InProcessCloud]:
    running = InProcessCloud(tmp_path / "cloud")
    running.config = running.config.model_copy(update={"rollouts": RolloutsSection(tick_s=0.05)})
    running.start()
    try:
        yield running
    finally:
        running.close()
    assert running.blocked == [], running.blocked


@pytest.fixture
def db(cloud: InProcessCloud) -> Iterator[Database]:
    database = open_database(cloud.config.database_url)
    yield database
    database.close()


def _service(cloud: InProcessCloud, devices: int = 4) -> RolloutService:
    """digits 1 and 2 registered, `devices` devices on 1; the running process's rollout service."""
    app = cloud.app
    assert app is not None and app.model_registry is not None and app.assignment_store is not None
    assert app.rollout_service is not None
    for version in (1, 2):
        manifest, _, _ = package(app.model_registry.blobs, "digits", version)
        app.model_registry.register(manifest, FAR_FUTURE_MS)
    for number in range(devices):
        cloud.add_device(f"cam-{number}")
    app.assignment_store.assign("digits", 1, {})
    return app.rollout_service


def test_a_breached_gate_aborts_as_gate_with_its_value_and_threshold(cloud: InProcessCloud, db: Database) -> None:
    service = _service(cloud)
    rollout = service.create("digits", 2, {}, "active:50%:1h,active:100%", "max_error_rate=0.1", by="ops-alice")
    telemetry = TelemetryStore(db)

    def aborted() -> bool:
        current = service.get(rollout.id)
        if current.state != "running":
            return True
        for device_id in service.stage_devices(current):
            send(telemetry, device_id, 2, requests=100, errors=40)
        return False

    wait_for(aborted, 20, "the gate to abort the rollout", poll=0.1)
    assert service.get(rollout.id).state == "aborted"
    records = AuditLog(db).query(target=f"rollout/{rollout.id}")
    assert [(r.actor, r.actor_kind, r.action) for r in records] == [
        ("gate:max_error_rate", "gate", "rollout.abort"),
        ("ops-alice", "token", "rollout.create"),
    ]
    abort = records[0]
    assert abort.before == {"state": "running", "stage_index": 0}
    assert abort.after is not None
    assert (abort.after["state"], abort.after["gate"], abort.after["threshold"]) == ("aborted", "max_error_rate", 0.1)
    assert abort.after["value"] == pytest.approx(0.4)
    assert "max_error_rate" in abort.reason
    # The record points at the events, which keep every gate's figures.
    events = {e.id: e for e in service.events(rollout.id)}
    kinds = [events[i].kind for i in abort.after["event_ids"]]
    assert kinds == ["gate_failed", "aborted"]
    assert events[abort.after["event_ids"][0]].values["gates"]["max_error_rate"]["threshold"] == 0.1


def test_advances_and_the_completion_are_the_controllers(cloud: InProcessCloud, db: Database) -> None:
    service = _service(cloud)
    rollout = service.create("digits", 2, {}, "active:50%,active:100%", "max_error_rate=0.1", by="ops-alice")
    telemetry = TelemetryStore(db)

    def completed() -> bool:
        current = service.get(rollout.id)
        if current.state != "running":
            return True
        for device_id in service.stage_devices(current):
            send(telemetry, device_id, 2)
        return False

    wait_for(completed, 20, "the controller to complete the rollout", poll=0.1)
    records = AuditLog(db).query(target=f"rollout/{rollout.id}")
    assert [(r.actor, r.actor_kind, r.action) for r in records] == [
        ("controller", "controller", "rollout.complete"),
        ("controller", "controller", "rollout.advance"),
        ("ops-alice", "token", "rollout.create"),
    ]
    assert records[1].before == {"state": "running", "stage_index": 0}
    assert records[1].after is not None and records[1].after["stage_index"] == 1
    assert records[0].after is not None and records[0].after["state"] == "completed"
