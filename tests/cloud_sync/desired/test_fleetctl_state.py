"""fleetctl models assign / unassign / assignments and the state in devices list / show, as real processes."""

from __future__ import annotations

import itertools
import json

from edgefleet.proto.edgefleet.v1 import services_pb2_grpc
from edgefleet.proto.edgefleet.v1.state_pb2 import ModelRole, ModelState, ModelStatus, ReportedState
from tests.cloud_sync.conftest import RunningCloudSync
from tests.cloud_sync.desired.test_api_state import push_model
from tests.cloud_sync.test_fleetctl import failed, fleetctl, ok

_numbers = itertools.count(1)


def test_assign_then_devices_list_and_show_tell_desired_from_reported(cloud_sync: RunningCloudSync) -> None:
    group = f"f{next(_numbers)}"
    name = f"plates-{group}"
    push_model(cloud_sync, name, 1)
    device_id, token = cloud_sync.new_device(labels={"fleetctl": group})
    printed = ok(fleetctl(cloud_sync, "models", "assign", name, "1", "--selector", f"fleetctl={group}"))
    assert f"{name}:1 assigned to fleetctl={group}" in printed
    listed = json.loads(ok(fleetctl(cloud_sync, "--json", "models", "assignments", "--model", name)))
    assert [(a["model"], a["version"]) for a in listed] == [(name, 1)]

    shown = ok(fleetctl(cloud_sync, "devices", "show", device_id))
    assert "desired generation 1, reported -: behind" in shown
    assert f"{name}: desired 1, running -, PENDING" in shown

    failing = ReportedState(device_id=device_id, generation=1)
    failing.models.append(
        ModelStatus(
            name=name,
            version=1,
            role=ModelRole.MODEL_ROLE_ACTIVE,
            state=ModelState.MODEL_STATE_FAILED,
            reason="bad-signature",
            attempts=3,
        )
    )
    services_pb2_grpc.ControlStub(cloud_sync.channel).Report(
        failing, metadata=[("authorization", f"Bearer {token}")], timeout=10
    )
    shown = ok(fleetctl(cloud_sync, "devices", "show", device_id))
    assert "desired generation 1, reported 1: in sync, converging" in shown
    assert f"{name}: desired 1, running -, FAILED (bad-signature; attempt 3)" in shown
    rows = {d["device_id"]: d for d in json.loads(ok(fleetctl(cloud_sync, "--json", "devices", "list")))}
    assert (rows[device_id]["desired_generation"], rows[device_id]["reported_generation"]) == (1, 1)
    assert device_id in ok(fleetctl(cloud_sync, "devices", "list"))

    assert f"{name} unassigned" in ok(
        fleetctl(cloud_sync, "models", "unassign", name, "--selector", f"fleetctl={group}")
    )


def test_bad_input_exits_2_with_the_reason(cloud_sync: RunningCloudSync) -> None:
    assert "not in the registry" in failed(fleetctl(cloud_sync, "models", "assign", "nosuch", "1"), 2)
    assert "not key=value" in failed(fleetctl(cloud_sync, "models", "assign", "x", "1", "--selector", "site"), 2)
    assert "no assignment" in failed(fleetctl(cloud_sync, "models", "unassign", "nosuch", "--selector", "a=b"), 4)
