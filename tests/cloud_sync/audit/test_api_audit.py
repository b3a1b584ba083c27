"""The audit log of a real cloud-sync: each change through the admin API is one record naming its token,
action, target, before and after; a refused call writes nothing; GET /v1/audit filters, pages and refuses
bad input.
"""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from tests.cloud_sync.conftest import RunningCloudSync
from tests.cloud_sync.desired.test_api_state import push_model
from tests.cloud_sync.roles.conftest import audit, client, new_token
from tests.cloud_sync.rollouts_api.test_api_rollouts import GATES, STAGES, fleet


def ok(response: httpx.Response, status: int = 200) -> Any:
    assert response.status_code == status, response.text
    return response.json()


def only(cloud: RunningCloudSync, actor: str, action: str) -> dict[str, Any]:
    """The one record of `actor` doing `action`."""
    found = audit(cloud, actor=actor, action=action)
    assert len(found) == 1, found
    return found[0]


def test_device_policy_assignment_and_enrollment_changes_are_recorded(cloud_sync: RunningCloudSync) -> None:
    name, token = new_token(cloud_sync, "admin", "aud")
    model = f"digits-{name}"
    push_model(cloud_sync, model, 1)
    with client(cloud_sync, token) as admin:
        ok(admin.post("/v1/devices", json={"device_id": f"{name}-cam", "labels": {"g": name}}), 201)
        ok(admin.post(f"/v1/devices/{name}-cam/revoke"))
        ok(admin.post(f"/v1/devices/{name}-cam/revoke"))  # changes nothing: no second record
        doc = {"selector": {"g": name}, "priority": 3, "document": {"inference": {"max_batch_size": 4}}}
        ok(admin.put(f"/v1/policies/{name}", json=doc))
        ok(admin.put(f"/v1/policies/{name}", json={**doc, "priority": 5}))
        ok(admin.delete(f"/v1/policies/{name}"))
        ok(admin.put("/v1/assignments", json={"model": model, "version": 1, "selector": {"g": name}}))
        ok(admin.request("DELETE", "/v1/assignments", json={"model": model, "selector": {"g": name}}))
        minted = ok(admin.post("/v1/enrollment-tokens", json={"labels": {"g": name}}), 201)

    added = only(cloud_sync, name, "device.add")
    assert (added["target"], added["actor_kind"], added["before"]) == (f"device/{name}-cam", "token", None)
    assert added["after"] == {"device_id": f"{name}-cam", "labels": {"g": name}}
    revoked = only(cloud_sync, name, "device.revoke")
    assert (revoked["before"]["revoked"], revoked["after"]["revoked"]) == (False, True)

    sets = audit(cloud_sync, actor=name, action="policy.set")
    assert [(r["before"] and r["before"]["priority"], r["after"]["priority"]) for r in sets] == [(3, 5), (None, 3)]
    assert sets[1]["target"] == f"policy/{name}" and sets[1]["after"]["document"] == doc["document"]
    deleted = only(cloud_sync, name, "policy.delete")
    assert deleted["before"]["priority"] == 5 and deleted["after"] is None

    assigned = only(cloud_sync, name, "assignment.set")
    assert assigned["target"] == f"assignment/{model}/g={name}" and assigned["before"] is None
    assert (assigned["after"]["model"], assigned["after"]["version"]) == (model, 1)
    unassigned = only(cloud_sync, name, "assignment.delete")
    assert unassigned["before"]["version"] == 1 and unassigned["after"] is None

    enrolled = only(cloud_sync, name, "enrollment_token.create")
    assert enrolled["after"]["labels"] == {"g": name} and minted["token"] not in str(enrolled)
    assert len(audit(cloud_sync, actor=name)) == 8


def test_model_register_sign_and_delete_are_recorded(cloud_sync: RunningCloudSync) -> None:
    name, token = new_token(cloud_sync, "admin", "aud")
    model = f"m-{name}".lower()
    # push_model registers with the bootstrap token; this token signs and deletes.
    push_model(cloud_sync, model, 1)
    registered = audit(cloud_sync, action="model.register", target=f"model/{model}:1")
    assert len(registered) == 1 and registered[0]["actor"] == "admin-token"
    push_model(cloud_sync, model, 1)  # the same manifest again: nothing changes, nothing recorded
    assert len(audit(cloud_sync, action="model.register", target=f"model/{model}:1")) == 1
    with client(cloud_sync, token) as admin:
        signed = ok(admin.post(f"/v1/models/{model}/1/sign", json={"expires_in_s": 3600}))
        ok(admin.delete(f"/v1/models/{model}/1"))
    sign = only(cloud_sync, name, "model.sign")
    assert sign["target"] == f"model/{model}:1"
    assert sign["after"]["serial"] == signed["serial"] and sign["before"]["serial"] < signed["serial"]
    delete = only(cloud_sync, name, "model.delete")
    assert delete["before"]["sha256"] == signed["sha256"] and delete["after"] is None


def test_each_rollout_transition_is_one_record_pointing_at_its_events(cloud_sync: RunningCloudSync) -> None:
    name, token = new_token(cloud_sync, "operator", "aud")
    model, selector = fleet(cloud_sync, devices=2)
    with client(cloud_sync, token) as operator:
        body = {"model": model, "to_version": 2, "selector": selector, "stages": STAGES, "gates": GATES}
        rollout_id = ok(operator.post("/v1/rollouts", json=body), 201)["id"]
        for action in ("pause", "resume", "promote", "abort"):
            ok(operator.post(f"/v1/rollouts/{rollout_id}/{action}", json={"reason": f"why {action}"}))
        # Refused (ended): nothing recorded.
        assert operator.post(f"/v1/rollouts/{rollout_id}/pause", json={}).status_code == 409
    records = audit(cloud_sync, target=f"rollout/{rollout_id}")
    assert [(r["actor"], r["action"]) for r in records] == [
        (name, "rollout.abort"),
        (name, "rollout.promote"),
        (name, "rollout.resume"),
        (name, "rollout.pause"),
        (name, "rollout.create"),
    ]
    assert [r["reason"] for r in records[:4]] == ["why abort", "why promote", "why resume", "why pause"]
    assert records[1]["before"] == {"state": "running", "stage_index": 0}
    assert {k: records[1]["after"][k] for k in ("state", "stage_index")} == {"state": "running", "stage_index": 1}
    assert records[0]["after"]["state"] == "aborted" and records[4]["after"]["to_version"] == 2
    events = ok(cloud_sync.api.get(f"/v1/rollouts/{rollout_id}/events"))["events"]
    by_id = {e["id"]: e["kind"] for e in events}
    assert [by_id[i] for r in reversed(records) for i in r["after"]["event_ids"]] == [
        "created",
        "paused",
        "resumed",
        "promoted",
        "aborted",
    ]


def test_a_refused_change_writes_nothing(cloud_sync: RunningCloudSync) -> None:
    name, token = new_token(cloud_sync, "admin", "aud")
    with client(cloud_sync, token) as admin:
        assert admin.post("/v1/devices", json={"device_id": "bad id!"}).status_code == 422
        assert admin.put(f"/v1/policies/{name}", json={"selector": {}, "document": {"nope": 1}}).status_code == 422
        assert admin.delete("/v1/policies/no-such-policy").status_code == 404
        assert admin.post("/v1/devices/no-such-device/revoke").status_code == 404
        body = {"model": "digits", "selector": {"x": name}}
        assert admin.request("DELETE", "/v1/assignments", json=body).status_code == 404
        assert admin.post("/v1/rollouts/ro-0000000000/abort", json={}).status_code == 404
        assert admin.post("/v1/enrollment-tokens", json={"expires_in_s": 1}).status_code == 422
    assert audit(cloud_sync, actor=name) == []


def test_the_audit_route_filters_and_pages(cloud_sync: RunningCloudSync) -> None:
    name, token = new_token(cloud_sync, "admin", "aud")
    with client(cloud_sync, token) as admin:
        for number in range(3):
            ok(admin.post("/v1/tokens", json={"name": f"{name}-{number}", "role": "viewer"}), 201)
        mine = audit(cloud_sync, actor=name)
        assert [r["target"] for r in mine] == [f"token/{name}-{n}" for n in (2, 1, 0)]
        page = ok(admin.get("/v1/audit", params={"actor": name, "limit": 2}))["records"]
        assert [r["id"] for r in page] == [r["id"] for r in mine[:2]]
        rest = ok(admin.get("/v1/audit", params={"actor": name, "before_id": page[-1]["id"]}))["records"]
        assert [r["id"] for r in rest] == [mine[2]["id"]]
        since = ok(admin.get("/v1/audit", params={"actor": name, "since_ms": mine[0]["at_ms"] + 1}))["records"]
        assert since == []
        both = {"actor": name, "action": "token.create", "target": f"token/{name}-1"}
        assert [r["id"] for r in ok(admin.get("/v1/audit", params=both))["records"]] == [mine[1]["id"]]
    with client(cloud_sync, new_token(cloud_sync, "viewer")[1]) as viewer:
        assert ok(viewer.get("/v1/audit", params={"actor": name}))["records"] == mine


@pytest.mark.parametrize(
    ("query", "field"),
    [
        ({"limit": 0}, "limit"),
        ({"limit": 1001}, "limit"),
        ({"limit": "many"}, "limit"),
        ({"since_ms": -1}, "since_ms"),
        ({"before_id": 0}, "before_id"),
        ({"actor": ""}, "actor"),
        ({"action": "x" * 65}, "action"),
    ],
)
def test_bad_audit_queries_are_refused_naming_the_field(
    cloud_sync: RunningCloudSync, query: dict[str, Any], field: str
) -> None:
    answer = cloud_sync.api.get("/v1/audit", params=query)
    assert answer.status_code == 422, answer.text
    assert answer.json()["detail"].startswith(f"{field}:")


def test_the_audit_route_needs_a_token(cloud_sync: RunningCloudSync) -> None:
    assert cloud_sync.api.get("/v1/audit", headers={"Authorization": "Bearer nope"}).status_code == 401
