"""Fixtures for rollouts: a real store (SQLite or PostgreSQL), its reconciler and the rollout service."""

from __future__ import annotations

import pytest

from cloud_sync.reconciler import Reconciler
from cloud_sync.rollouts.service import RolloutService
from cloud_sync.rollouts.store import RolloutStore
from cloud_sync.store import Database, DeviceRegistry
from cloud_sync.store.assignments import AssignmentStore
from cloud_sync.store.control import ControlStore
from cloud_sync.store.policies import PolicyStore
from edgefleet.proto.edgefleet.v1.state_pb2 import ModelRole
from tests.cloud_sync.desired.conftest import Catalog

ROLES = {ModelRole.MODEL_ROLE_ACTIVE: "active", ModelRole.MODEL_ROLE_SHADOW: "shadow"}


@pytest.fixture
def catalog() -> Catalog:
    return Catalog({("digits", 1): "a" * 64, ("digits", 2): "b" * 64, ("digits", 3): "c" * 64})


@pytest.fixture
def reconciler(
    db: Database, devices: DeviceRegistry, assignments: AssignmentStore, catalog: Catalog, control: ControlStore
) -> Reconciler:
    return Reconciler(devices, assignments, PolicyStore(db), catalog, control, RolloutStore(db))


@pytest.fixture
def service(
    db: Database, reconciler: Reconciler, assignments: AssignmentStore, catalog: Catalog, devices: DeviceRegistry
) -> RolloutService:
    return RolloutService(db, reconciler, assignments, catalog, devices)


def fleet(devices: DeviceRegistry, assignments: AssignmentStore, count: int, site: str = "lab") -> list[str]:
    """`count` devices labelled site=`site`, all assigned digits:1."""
    ids = [f"{site}-{i:03d}" for i in range(count)]
    for device_id in ids:
        devices.add_device(device_id, {"site": site})
    assignments.assign("digits", 1, {})
    return ids


def runs(control: ControlStore, device_id: str) -> list[tuple[int, str, str]]:
    """(version, role, rollout id) of digits in the device's desired state."""
    state = control.desired(device_id)
    assert state is not None
    return [(m.version, ROLES[m.role], m.rollout_id) for m in state.models if m.name == "digits"]
