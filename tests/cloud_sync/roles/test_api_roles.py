"""Roles on a real cloud-sync: each mutating route of the app's own route table needs the role this table
gives it, a viewer reads and is refused every change (403 naming the role), an operator runs rollouts but not
tokens, policies or devices, an admin does everything; a revoked token gets 401 at once.
"""

from __future__ import annotations

from typing import Any

import pytest

from tests.cloud_sync.conftest import RunningCloudSync
from tests.cloud_sync.roles.conftest import audit, call, client, concrete, mutating_routes, new_token, read_routes
from tests.cloud_sync.rollouts_api.test_api_rollouts import GATES, STAGES, fleet

# Every mutating route and the least role that may call it. A route the app gains that is not here fails
# test_every_mutating_route_has_a_role: its role must be decided, not left to chance.
NEEDS = {
    ("PUT", "/v1/blobs/{sha256}"): "operator",
    ("POST", "/v1/models"): "operator",
    ("POST", "/v1/models/{name}/{version}/sign"): "operator",
    ("POST", "/v1/models/{name}/{version}/compress"): "operator",
    ("PUT", "/v1/assignments"): "operator",
    ("DELETE", "/v1/assignments"): "operator",
    ("POST", "/v1/rollouts"): "operator",
    ("POST", "/v1/rollouts/{rollout_id}/pause"): "operator",
    ("POST", "/v1/rollouts/{rollout_id}/resume"): "operator",
    ("POST", "/v1/rollouts/{rollout_id}/abort"): "operator",
    ("POST", "/v1/rollouts/{rollout_id}/promote"): "operator",
    ("DELETE", "/v1/models/{name}/{version}"): "admin",
    ("POST", "/v1/devices"): "admin",
    ("POST", "/v1/devices/{device_id}/revoke"): "admin",
    ("POST", "/v1/enrollment-tokens"): "admin",
    ("PUT", "/v1/policies/{name}"): "admin",
    ("DELETE", "/v1/policies/{name}"): "admin",
    ("POST", "/v1/tokens"): "admin",
    ("DELETE", "/v1/tokens/{name}"): "admin",
}
# Reads that are the admin's: they list credentials.
ADMIN_READS = {"/v1/tokens", "/v1/enrollment-tokens"}
# Field data leaving the system: exporting the samples devices kept needs the operator role.
OPERATOR_READS = {"/v1/samples/export"}


def test_every_mutating_route_has_a_role(cloud_sync: RunningCloudSync) -> None:
    assert sorted(mutating_routes(cloud_sync)) == sorted(NEEDS)


def test_a_viewer_reads_and_is_refused_every_change_naming_the_role(cloud_sync: RunningCloudSync) -> None:
    name, token = new_token(cloud_sync, "viewer")
    with client(cloud_sync, token) as viewer:
        for method, path in mutating_routes(cloud_sync):
            answer = call(viewer, method, path)
            assert answer.status_code == 403, (method, path, answer.text)
            assert answer.json() == {
                "detail": f"this call needs the {NEEDS[method, path]} role; the token is viewer",
                "errors": [],
            }
        for path in read_routes(cloud_sync):
            answer = viewer.get(concrete(path))
            if path in ADMIN_READS:
                assert answer.status_code == 403 and "needs the admin role" in answer.text, path
            elif path in OPERATOR_READS:
                assert answer.status_code == 403 and "needs the operator role" in answer.text, path
            else:
                assert answer.status_code not in (401, 403), (path, answer.text)
        assert viewer.get("/v1/devices").status_code == 200
        assert viewer.get("/v1/whoami").json() == {"name": name, "role": "viewer"}
    assert audit(cloud_sync, actor=name) == []


def test_an_operator_runs_a_rollout_but_cannot_touch_tokens_policies_or_devices(cloud_sync: RunningCloudSync) -> None:
    name, token = new_token(cloud_sync, "operator")
    model, selector = fleet(cloud_sync, devices=2)
    with client(cloud_sync, token) as operator:
        for method, path in mutating_routes(cloud_sync):
            answer = call(operator, method, path)
            if NEEDS[method, path] == "admin":
                assert answer.status_code == 403, (method, path, answer.text)
                assert answer.json()["detail"] == "this call needs the admin role; the token is operator"
            else:
                assert answer.status_code not in (401, 403), (method, path, answer.text)
        body = {"model": model, "to_version": 2, "selector": selector, "stages": STAGES, "gates": GATES}
        created = operator.post("/v1/rollouts", json=body)
        assert created.status_code == 201, created.text
        rollout_id = created.json()["id"]
        assert operator.post(f"/v1/rollouts/{rollout_id}/pause", json={"reason": "look"}).status_code == 200
        assert operator.post(f"/v1/rollouts/{rollout_id}/abort", json={}).status_code == 200
        refused = operator.put("/v1/policies/lab", json={"selector": {}, "document": {}})
        assert refused.status_code == 403
        assert operator.post("/v1/devices", json={"device_id": "op-made"}).status_code == 403
        assert operator.post("/v1/tokens", json={"name": "op-made", "role": "admin"}).status_code == 403
    actions = [(r["action"], r["target"]) for r in audit(cloud_sync, actor=name)]
    assert actions == [
        ("rollout.abort", f"rollout/{rollout_id}"),
        ("rollout.pause", f"rollout/{rollout_id}"),
        (
            "rollout.create",
            f"rollout/{rollout_id}",
        ),
    ]
    assert cloud_sync.api.get("/v1/policies/lab").status_code == 404
    assert cloud_sync.api.get("/v1/devices/op-made").status_code == 404


def test_an_admin_token_does_everything(cloud_sync: RunningCloudSync) -> None:
    name, token = new_token(cloud_sync, "admin")
    with client(cloud_sync, token) as admin:
        for method, path in mutating_routes(cloud_sync):
            answer = call(admin, method, path)
            assert answer.status_code not in (401, 403), (method, path, answer.text)
        assert admin.get("/v1/tokens").status_code == 200
        device = admin.post("/v1/devices", json={"device_id": f"{name}-cam", "labels": {"site": "x"}})
        assert device.status_code == 201, device.text
        made = admin.post("/v1/tokens", json={"name": f"{name}-sub", "role": "viewer"})
        assert made.status_code == 201, made.text
        assert admin.delete(f"/v1/tokens/{name}-sub").json()["revoked_at_ms"] is not None
        policy = admin.put(f"/v1/policies/{name}", json={"selector": {"site": "x"}, "document": {}})
        assert policy.status_code == 200, policy.text
        assert admin.delete(f"/v1/policies/{name}").status_code == 200
    assert [r["action"] for r in audit(cloud_sync, actor=name)] == [
        "policy.delete",
        "policy.set",
        "token.revoke",
        "token.create",
        "device.add",
        "enrollment_token.create",  # the walk's POST {}: every field of a new enrollment token is optional
    ]


def test_a_revoked_token_gets_401_at_once(cloud_sync: RunningCloudSync) -> None:
    name, token = new_token(cloud_sync, "operator")
    with client(cloud_sync, token) as operator:
        assert operator.get("/v1/whoami").status_code == 200  # cached as valid now
        revoked = cloud_sync.api.delete(f"/v1/tokens/{name}")
        assert revoked.status_code == 200, revoked.text
        assert revoked.json()["name"] == name and revoked.json()["revoked_at_ms"] is not None
        refused = operator.get("/v1/whoami")
        assert refused.status_code == 401 and refused.headers["WWW-Authenticate"] == "Bearer"
        assert "fleetctl tokens create" in refused.json()["detail"]
    listed = {t["name"]: t for t in cloud_sync.api.get("/v1/tokens").json()["tokens"]}
    assert listed[name]["revoked_at_ms"] is not None and listed[name]["created_by"] == "admin-token"


def test_a_token_created_after_being_tried_works_at_once(cloud_sync: RunningCloudSync) -> None:
    with client(cloud_sync, "efa_not-a-token-yet") as nobody:
        assert nobody.get("/v1/whoami").status_code == 401
    name, token = new_token(cloud_sync, "viewer")
    with client(cloud_sync, token) as viewer:
        assert viewer.get("/v1/whoami").json() == {"name": name, "role": "viewer"}


def test_the_bootstrap_token_is_admin_token_and_cannot_be_revoked(cloud_sync: RunningCloudSync) -> None:
    assert cloud_sync.api.get("/v1/whoami").json() == {"name": "admin-token", "role": "admin"}
    refused = cloud_sync.api.delete("/v1/tokens/admin-token")
    assert refused.status_code == 422 and "bootstrap admin token" in refused.json()["detail"]
    assert cloud_sync.api.get("/v1/whoami").status_code == 200
    assert audit(cloud_sync, target="token/admin-token") == []


def _bad_token_bodies() -> list[tuple[Any, str]]:
    return [
        ({"role": "viewer"}, "name: Field required"),
        ({"name": "", "role": "viewer"}, "name:"),
        ({"name": "a" * 65, "role": "viewer"}, "name:"),
        ({"name": "has space", "role": "viewer"}, "name:"),
        ({"name": "ok-name", "role": "root"}, "role:"),
        ({"name": "ok-name"}, "role: Field required"),
        ({"name": "ok-name", "role": "viewer", "token": "efa_mine"}, "token: Extra inputs are not permitted"),
        ({"name": "admin-token", "role": "admin"}, "bootstrap admin token"),
        (["ok-name"], "body:"),
    ]


@pytest.mark.parametrize(("body", "message"), _bad_token_bodies())
def test_bad_input_to_the_token_routes_is_refused_and_changes_nothing(
    cloud_sync: RunningCloudSync, body: Any, message: str
) -> None:
    before = cloud_sync.api.get("/v1/tokens").json()["tokens"]
    records = audit(cloud_sync, action="token.create")
    answer = cloud_sync.api.post("/v1/tokens", json=body)
    assert answer.status_code == 422, answer.text
    assert message in answer.json()["detail"]
    assert cloud_sync.api.get("/v1/tokens").json()["tokens"] == before
    assert audit(cloud_sync, action="token.create") == records


def test_a_taken_name_unknown_and_malformed_names_are_refused(cloud_sync: RunningCloudSync) -> None:
    name, _ = new_token(cloud_sync, "viewer")
    records = len(audit(cloud_sync))
    taken = cloud_sync.api.post("/v1/tokens", json={"name": name, "role": "admin"})
    assert taken.status_code == 409 and "revoke it first" in taken.json()["detail"]
    unknown = cloud_sync.api.delete("/v1/tokens/nobody-has-this")
    assert unknown.status_code == 404 and "no token named 'nobody-has-this'" in unknown.json()["detail"]
    assert cloud_sync.api.delete("/v1/tokens/bad%20name").status_code == 422
    assert cloud_sync.api.delete(f"/v1/tokens/{'a' * 65}").status_code == 422
    assert len(audit(cloud_sync)) == records


def test_whoami_needs_a_token(cloud_sync: RunningCloudSync) -> None:
    with client(cloud_sync, "") as nobody:
        assert nobody.get("/v1/whoami", headers={"Authorization": ""}).status_code == 401
