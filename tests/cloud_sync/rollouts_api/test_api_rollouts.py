"""The rollout routes of a real cloud-sync: create, list, show with progress, events, pause/resume/abort/promote,
and bad input to each (a clear 4xx that changes nothing).

Each test makes its own model and devices (a label of its own); bake times of an hour keep the controller from
moving these rollouts by itself.
"""

from __future__ import annotations

import itertools
from typing import Any

import pytest

from tests.cloud_sync.conftest import RunningCloudSync
from tests.cloud_sync.desired.test_api_state import push_model

_numbers = itertools.count(1)
STAGES = "shadow:25%:1h,active:50%:1h,active:100%:1h"
GATES = "max_error_rate=0.01,max_p99_ratio=1.5,min_shadow_agreement=0.95,min_devices=1"


def fleet(cloud: RunningCloudSync, devices: int = 4) -> tuple[str, dict[str, str]]:
    """A model with versions 1, 2 and 3, v1 assigned to `devices` devices of a label of their own; (name, selector)."""
    group = f"ra{next(_numbers)}"
    name = f"digits-{group}"
    for version in (1, 2, 3):
        push_model(cloud, name, version)
    for _ in range(devices):
        cloud.new_device(labels={"ra": group})
    selector = {"ra": group}
    put = cloud.api.put("/v1/assignments", json={"model": name, "version": 1, "selector": selector})
    assert put.status_code == 200, put.text
    return name, selector


def create(cloud: RunningCloudSync, name: str, selector: dict[str, str], **overrides: Any) -> dict[str, Any]:
    body = {"model": name, "to_version": 2, "selector": selector, "stages": STAGES, "gates": GATES, **overrides}
    response = cloud.api.post("/v1/rollouts", json=body)
    assert response.status_code == 201, response.text
    created: dict[str, Any] = response.json()
    return created


def post(cloud: RunningCloudSync, rollout_id: str, action: str, reason: str = "") -> dict[str, Any]:
    response = cloud.api.post(f"/v1/rollouts/{rollout_id}/{action}", json={"reason": reason})
    assert response.status_code == 200, response.text
    moved: dict[str, Any] = response.json()
    return moved


def events(cloud: RunningCloudSync, rollout_id: str, after_id: int = 0) -> list[dict[str, Any]]:
    response = cloud.api.get(f"/v1/rollouts/{rollout_id}/events", params={"after_id": after_id})
    assert response.status_code == 200, response.text
    found: list[dict[str, Any]] = response.json()["events"]
    return found


def test_create_shows_the_plan_and_each_stages_devices(cloud_sync: RunningCloudSync) -> None:
    name, selector = fleet(cloud_sync)
    created = create(cloud_sync, name, selector)
    assert created["id"].startswith("ro-")
    assert (created["model"], created["from_version"], created["to_version"]) == (name, 1, 2)
    assert (created["state"], created["stage_index"], created["matched_devices"]) == ("running", 0, 4)
    assert created["stages_text"] == "shadow:25%:3600s,active:50%:3600s,active:100%:3600s"
    assert created["gates"]["max_error_rate"] == 0.01 and created["gates"]["min_devices"] == 1
    assert [(s["text"], s["devices"], s["status"]) for s in created["progress"]] == [
        ("shadow:25%:3600s", 1, "current"),
        ("active:50%:3600s", 2, "pending"),
        ("active:100%:3600s", 4, "pending"),
    ]
    assert len(created["stage_devices"]) == 1

    shown = cloud_sync.api.get(f"/v1/rollouts/{created['id']}").json()
    assert shown["progress"] == created["progress"] and shown["stage_devices"] == created["stage_devices"]
    listed = cloud_sync.api.get("/v1/rollouts").json()["rollouts"]
    assert created["id"] in [r["id"] for r in listed]
    running = cloud_sync.api.get("/v1/rollouts", params={"state": "running"}).json()["rollouts"]
    assert created["id"] in [r["id"] for r in running]
    completed = cloud_sync.api.get("/v1/rollouts", params={"state": "completed"}).json()["rollouts"]
    assert created["id"] not in [r["id"] for r in completed]
    assert [(e["kind"], e["actor"]) for e in events(cloud_sync, created["id"])] == [("created", "operator")]


def test_stages_and_gates_may_be_given_as_objects(cloud_sync: RunningCloudSync) -> None:
    name, selector = fleet(cloud_sync)
    created = create(
        cloud_sync,
        name,
        selector,
        stages=[{"mode": "active", "percent": 50, "bake_s": 3600}, "active:100%"],
        gates={"max_error_rate": 0.05, "min_devices": 2},
        shadow_sample_rate=0.5,
    )
    assert created["stages_text"] == "active:50%:3600s,active:100%"
    assert (created["gates"]["max_error_rate"], created["gates"]["min_devices"]) == (0.05, 2)
    assert created["shadow_sample_rate"] == 0.5


def test_pause_resume_promote_abort_each_leave_an_event_with_its_reason(cloud_sync: RunningCloudSync) -> None:
    name, selector = fleet(cloud_sync)
    rollout_id = create(cloud_sync, name, selector)["id"]
    assert post(cloud_sync, rollout_id, "pause", "looking at a dashboard")["state"] == "paused"
    assert cloud_sync.api.post(f"/v1/rollouts/{rollout_id}/pause", json={}).status_code == 409
    assert post(cloud_sync, rollout_id, "resume")["state"] == "running"
    promoted = post(cloud_sync, rollout_id, "promote", "shadow looks fine")
    assert (promoted["state"], promoted["stage_index"]) == ("running", 1)
    assert [s["status"] for s in promoted["progress"]] == ["done", "current", "pending"]
    aborted = post(cloud_sync, rollout_id, "abort", "changed my mind")
    assert (aborted["state"], aborted["reason"]) == ("aborted", "changed my mind")
    for action in ("pause", "resume", "abort", "promote"):
        refused = cloud_sync.api.post(f"/v1/rollouts/{rollout_id}/{action}", json={"reason": "again"})
        assert refused.status_code == 409, (action, refused.text)
        assert "aborted" in refused.json()["detail"]

    found = events(cloud_sync, rollout_id)
    assert [(e["kind"], e["actor"], e["reason"]) for e in found][1:] == [
        ("paused", "operator", "looking at a dashboard"),
        ("resumed", "operator", ""),
        ("promoted", "operator", "shadow looks fine"),
        ("aborted", "operator", "changed my mind"),
    ]
    # Paging: only what came after the given event id.
    assert [e["kind"] for e in events(cloud_sync, rollout_id, found[2]["id"])] == ["promoted", "aborted"]
    page = cloud_sync.api.get(f"/v1/rollouts/{rollout_id}/events", params={"after_id": found[-1]["id"]}).json()
    assert page == {"events": [], "next_after_id": found[-1]["id"]}


def test_promoting_past_the_last_stage_completes_and_assigns_the_new_version(cloud_sync: RunningCloudSync) -> None:
    name, selector = fleet(cloud_sync)
    rollout_id = create(cloud_sync, name, selector)["id"]
    post(cloud_sync, rollout_id, "promote")  # the body may also be left out:
    assert cloud_sync.api.post(f"/v1/rollouts/{rollout_id}/promote").status_code == 200
    done = post(cloud_sync, rollout_id, "promote")
    assert done["state"] == "completed" and all(s["status"] == "done" for s in done["progress"])
    assigned = cloud_sync.api.get("/v1/assignments", params={"model": name}).json()["assignments"]
    assert [(a["version"], a["selector"]) for a in assigned] == [(2, selector)]
    assert [e["kind"] for e in events(cloud_sync, rollout_id)][-2:] == ["promoted", "completed"]
    ids = [r["id"] for r in cloud_sync.api.get("/v1/rollouts", params={"state": "completed"}).json()["rollouts"]]
    assert rollout_id in ids


def _bad_bodies() -> list[tuple[dict[str, Any], int, str]]:
    return [
        ({"stages": None}, 422, "stages"),
        ({"stages": "shadow:10%:60s"}, 422, "stages: the last stage is 'shadow:10%:60s': it must be active:100%"),
        ({"stages": "active:50%,active:10%,active:100%"}, 422, "percents may not decrease"),
        ({"stages": "canary:10%,active:100%"}, 422, "stage 'canary:10%'"),
        ({"stages": [{"mode": "active", "percent": "all"}]}, 422, "stages: stage"),
        ({"stages": "active:100%:forever"}, 422, "bake time"),
        ({"stages": "x" * 5000}, 422, "stages: longer than"),
        ({"gates": "bogus=1"}, 422, "gates: unknown gate 'bogus'"),
        ({"gates": "max_error_rate=2"}, 422, "gates: gate max_error_rate='2': a rate within 0..1"),
        ({"gates": "min_devices=0"}, 422, "min_devices"),
        ({"gates": {"max_p99_ratio": "fast"}}, 422, "max_p99_ratio"),
        ({"shadow_sample_rate": 0}, 422, "shadow_sample_rate"),
        ({"shadow_sample_rate": 1.5}, 422, "shadow_sample_rate"),
        ({"selector": {"bad key!": "x"}}, 422, "selector: selector key"),
        ({"model": "Not A Name"}, 422, "model name"),
        ({"to_version": 0}, 422, "to_version"),
        ({"to_version": 9}, 422, "is not in the registry"),
        ({"to_version": 1}, 409, "already"),
        ({"surprise": 1}, 422, "surprise"),
    ]


@pytest.mark.parametrize(("override", "code", "says"), _bad_bodies())
def test_a_bad_create_is_refused_naming_the_field_and_creates_nothing(
    cloud_sync: RunningCloudSync, override: dict[str, Any], code: int, says: str
) -> None:
    name, selector = fleet(cloud_sync, devices=1)
    body = {"model": name, "to_version": 2, "selector": selector, "stages": STAGES, "gates": GATES, **override}
    before = [r["id"] for r in cloud_sync.api.get("/v1/rollouts").json()["rollouts"]]
    response = cloud_sync.api.post("/v1/rollouts", json=body)
    assert response.status_code == code, response.text
    assert says in response.text
    # Nothing created (other tests' rollouts may change meanwhile: the controller evaluates them).
    assert [r["id"] for r in cloud_sync.api.get("/v1/rollouts").json()["rollouts"]] == before


def test_a_second_rollout_of_the_model_on_the_same_devices_is_refused(cloud_sync: RunningCloudSync) -> None:
    name, selector = fleet(cloud_sync)
    first = create(cloud_sync, name, selector)
    again = cloud_sync.api.post(
        "/v1/rollouts", json={"model": name, "to_version": 3, "selector": selector, "stages": "active:100%"}
    )
    assert again.status_code == 409, again.text
    assert first["id"] in again.text or "in progress" in again.text


@pytest.mark.parametrize(
    ("method", "path", "kwargs", "code", "says"),
    [
        ("GET", "/v1/rollouts/ro-0000000000", {}, 404, "ro-0000000000"),
        ("GET", "/v1/rollouts/ro-0000000000/events", {}, 404, "ro-0000000000"),
        ("POST", "/v1/rollouts/ro-0000000000/pause", {"json": {}}, 404, "ro-0000000000"),
        ("GET", "/v1/rollouts/nope", {}, 422, "'nope' is not ro- and 10 hex digits"),
        ("POST", "/v1/rollouts/nope/abort", {"json": {}}, 422, "'nope'"),
        ("GET", "/v1/rollouts", {"params": {"state": "sleeping"}}, 422, "state"),
        ("GET", "/v1/rollouts/ro-0000000000/events", {"params": {"after_id": -1}}, 422, "after_id"),
        ("POST", "/v1/rollouts/ro-0000000000/pause", {"json": {"reason": "x" * 1001}}, 422, "reason"),
        ("POST", "/v1/rollouts/ro-0000000000/pause", {"json": {"why": "x"}}, 422, "why"),
    ],
)
def test_unknown_ids_are_404_and_malformed_input_422(
    cloud_sync: RunningCloudSync, method: str, path: str, kwargs: dict[str, Any], code: int, says: str
) -> None:
    response = cloud_sync.api.request(method, path, **kwargs)
    assert response.status_code == code, response.text
    assert says in response.text


def test_every_route_needs_the_admin_token(cloud_sync: RunningCloudSync) -> None:
    wrong = {"Authorization": "Bearer nope"}
    assert cloud_sync.api.get("/v1/rollouts", headers=wrong).status_code == 401
    assert cloud_sync.api.post("/v1/rollouts", json={}, headers=wrong).status_code == 401
    assert cloud_sync.api.post("/v1/rollouts/ro-0000000000/abort", json={}, headers=wrong).status_code == 401
