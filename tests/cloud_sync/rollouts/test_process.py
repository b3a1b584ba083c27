"""Rollouts in a running cloud-sync: its controller loop moves a rollout on the telemetry in its store."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from cloud_sync.config import RolloutsSection
from cloud_sync.store import TelemetryStore, open_database
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


def test_the_running_controller_completes_a_healthy_rollout_and_its_devices_end_on_b(cloud: InProcessCloud) -> None:
    app = cloud.app
    assert app is not None and app.model_registry is not None and app.assignment_store is not None
    assert app.rollout_service is not None
    for version in (1, 2):
        manifest, _, _ = package(app.model_registry.blobs, "digits", version)
        app.model_registry.register(manifest, FAR_FUTURE_MS)
    ids = [f"cam-{i}" for i in range(4)]
    for device_id in ids:
        cloud.add_device(device_id)
    app.assignment_store.assign("digits", 1, {})
    rollout = app.rollout_service.create("digits", 2, {}, "active:50%,active:100%", "max_error_rate=0.1")
    db = open_database(cloud.config.database_url)
    telemetry = TelemetryStore(db)

    def stage_served() -> bool:
        current = app.rollout_service.get(rollout.id)  # type: ignore[union-attr]
        if current.state != "running":
            return True
        for device_id in app.rollout_service.stage_devices(current):  # type: ignore[union-attr]
            send(telemetry, device_id, 2)
        return False

    try:
        wait_for(stage_served, 20, "the controller to complete the rollout", poll=0.1)
    finally:
        db.close()
    assert app.rollout_service.get(rollout.id).state == "completed"
    for device_id in ids:
        state = cloud.control.desired(device_id)
        assert state is not None and [(m.name, m.version) for m in state.models] == [("digits", 2)]
