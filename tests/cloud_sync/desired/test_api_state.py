"""The assignment and device-state routes of a real cloud-sync: assign -> desired state -> report -> in sync.

Each test selects devices by a label of its own, so tests sharing the session's cloud-sync never meet.
"""

from __future__ import annotations

import hashlib
import itertools
from typing import Any

import pytest

from cloud_sync.api_state import device_state_json
from edgefleet.proto.edgefleet.v1 import services_pb2_grpc
from edgefleet.proto.edgefleet.v1.state_pb2 import (
    DesiredState,
    ModelAssignment,
    ModelRole,
    ModelState,
    ModelStatus,
    ReportedState,
)
from tests.cloud_sync.conftest import RunningCloudSync

_numbers = itertools.count(1)


def push_model(cloud: RunningCloudSync, name: str, version: int) -> str:
    """Register a (fake) model version through the admin API; its sha256."""
    body = f"{name}:{version} onnx bytes".encode()
    sha = hashlib.sha256(body).hexdigest()
    put = cloud.api.put(f"/v1/blobs/{sha}", content=body)
    assert put.status_code in (200, 201), put.text
    manifest = {
        "name": name,
        "version": version,
        "platform": "onnx",
        "inputs": [{"name": "x", "dtype": "float32", "shape": [-1, 4]}],
        "outputs": [{"name": "y", "dtype": "float32", "shape": [-1, 2]}],
        "sha256": sha,
        "size": len(body),
    }
    created = cloud.api.post("/v1/models", json={"manifest": manifest})
    assert created.status_code in (200, 201), created.text
    return sha


def report(cloud: RunningCloudSync, token: str, state: ReportedState) -> None:
    stub = services_pb2_grpc.ControlStub(cloud.channel)
    stub.Report(state, metadata=[("authorization", f"Bearer {token}")], timeout=10)


def state_of(cloud: RunningCloudSync, device_id: str) -> dict[str, Any]:
    response = cloud.api.get(f"/v1/devices/{device_id}/state")
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def test_an_assignment_reaches_the_matching_devices_and_their_reports_show_convergence(
    cloud_sync: RunningCloudSync,
) -> None:
    group = f"g{next(_numbers)}"
    name = f"digits-{group}"
    sha = push_model(cloud_sync, name, 1)
    device_id, token = cloud_sync.new_device(labels={"test": group})
    other_id, _ = cloud_sync.new_device(labels={"test": f"{group}-other"})
    put = cloud_sync.api.put("/v1/assignments", json={"model": name, "version": 1, "selector": {"test": group}})
    assert put.status_code == 200, put.text
    assert put.json()["selector_text"] == f"test={group}"

    shown = state_of(cloud_sync, device_id)
    desired = shown["desired"]
    assert [(m["name"], m["version"], m["sha256"]) for m in desired["models"]] == [(name, 1, sha)]
    assert shown["models"] == [
        {
            "name": name,
            "desired_version": 1,
            "reported_version": None,
            "state": "PENDING",
            "reason": "",
            "progress": 0.0,
            "attempts": 0,
            "next_attempt_at_ms": 0,
        }
    ]
    assert (shown["in_sync"], shown["converged"], shown["reported"]) == (False, False, None)
    assert state_of(cloud_sync, other_id)["desired"] is None

    generation = int(desired["generation"])
    running = ReportedState(device_id=device_id, generation=generation, converged=True)
    running.models.append(
        ModelStatus(name=name, version=1, role=ModelRole.MODEL_ROLE_ACTIVE, state=ModelState.MODEL_STATE_ACTIVE)
    )
    report(cloud_sync, token, running)
    shown = state_of(cloud_sync, device_id)
    assert (shown["in_sync"], shown["converged"]) == (True, True)
    assert shown["models"][0]["reported_version"] == 1 and shown["models"][0]["state"] == "ACTIVE"
    rows = {d["device_id"]: d for d in cloud_sync.api.get("/v1/devices").json()["devices"]}
    assert (rows[device_id]["desired_generation"], rows[device_id]["reported_generation"]) == (generation, generation)
    assert rows[device_id]["converged"] is True
    assert rows[other_id]["desired_generation"] is None
    assert cloud_sync.device(device_id)["state"]["converged"] is True

    listed = cloud_sync.api.get("/v1/assignments", params={"model": name}).json()["assignments"]
    assert [(a["model"], a["version"], a["selector"]) for a in listed] == [(name, 1, {"test": group})]
    # A version in use cannot leave the registry.
    assert cloud_sync.api.delete(f"/v1/models/{name}/1").status_code == 409

    removed = cloud_sync.api.request("DELETE", "/v1/assignments", json={"model": name, "selector": {"test": group}})
    assert removed.status_code == 200, removed.text
    after = state_of(cloud_sync, device_id)
    assert after["desired"]["models"] == [] and int(after["desired"]["generation"]) == generation + 1
    assert after["in_sync"] is False


def test_a_higher_priority_assignment_wins_where_selectors_overlap(cloud_sync: RunningCloudSync) -> None:
    group = f"g{next(_numbers)}"
    name = f"faces-{group}"
    push_model(cloud_sync, name, 1)
    push_model(cloud_sync, name, 2)
    front, _ = cloud_sync.new_device(labels={"test": group, "cam": "front"})
    back, _ = cloud_sync.new_device(labels={"test": group, "cam": "back"})
    for version, selector, priority in ((1, {"test": group}, 0), (2, {"test": group, "cam": "front"}, 5)):
        put = cloud_sync.api.put(
            "/v1/assignments", json={"model": name, "version": version, "selector": selector, "priority": priority}
        )
        assert put.status_code == 200, put.text
    assert [m["version"] for m in state_of(cloud_sync, front)["desired"]["models"]] == [2]
    assert [m["version"] for m in state_of(cloud_sync, back)["desired"]["models"]] == [1]


@pytest.mark.parametrize(
    "body, status, reason",
    [
        ({"model": "nosuchmodel", "version": 1, "selector": {}}, 422, "nosuchmodel:1 is not in the registry"),
        ({"model": "Bad Name", "version": 1, "selector": {}}, 422, "invalid model name"),
        ({"model": "digits", "version": 0, "selector": {}}, 422, "version"),
        ({"model": "digits", "version": 1, "selector": {"bad key": "x"}}, 422, "selector key"),
        ({"model": "digits", "version": 1, "selector": {}, "extra": 1}, 422, "extra"),
        ({"model": "digits", "version": 1, "selector": {}, "priority": 10**9}, 422, "priority"),
    ],
)
def test_a_bad_assignment_is_refused_with_its_reason_and_changes_nothing(
    cloud_sync: RunningCloudSync, body: dict[str, Any], status: int, reason: str
) -> None:
    before = cloud_sync.api.get("/v1/assignments").json()
    response = cloud_sync.api.put("/v1/assignments", json=body)
    assert response.status_code == status, response.text
    assert reason in response.text
    assert cloud_sync.api.get("/v1/assignments").json() == before


def test_unknown_assignment_or_device_is_404(cloud_sync: RunningCloudSync) -> None:
    response = cloud_sync.api.request("DELETE", "/v1/assignments", json={"model": "nosuch", "selector": {"a": "b"}})
    assert response.status_code == 404 and "no assignment" in response.text
    assert cloud_sync.api.get("/v1/devices/nobody/state").status_code == 404


def test_a_models_desired_version_is_its_active_one_not_a_shadow_candidate_beside_it() -> None:
    desired = DesiredState(device_id="d", generation=3)
    desired.models.append(ModelAssignment(name="digits", version=1, role=ModelRole.MODEL_ROLE_ACTIVE))
    desired.models.append(ModelAssignment(name="digits", version=2, role=ModelRole.MODEL_ROLE_SHADOW))
    shown = device_state_json("d", desired, None, [])
    assert [(m["name"], m["desired_version"]) for m in shown["models"]] == [("digits", 1)]
