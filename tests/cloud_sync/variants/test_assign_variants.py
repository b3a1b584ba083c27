"""Assigning a compressed variant by hand (PUT /v1/assignments, `fleetctl models assign`): refused with the way to
prove it (a rollout through a shadow stage) and nothing changed, unless `force` is given, which the audit log
records. A plain version is assigned as before.
"""

from __future__ import annotations

from tests.cloud_sync.conftest import RunningCloudSync
from tests.cloud_sync.roles.conftest import audit
from tests.cloud_sync.test_fleetctl import failed, fleetctl, ok
from tests.cloud_sync.variants.conftest import family


def assigned(cloud: RunningCloudSync, name: str) -> list[tuple[int, str]]:
    found = cloud.api.get("/v1/assignments", params={"model": name}).json()["assignments"]
    return [(a["version"], a["selector_text"]) for a in found]


def test_a_variant_is_not_assigned_without_force_and_nothing_changes(cloud_sync: RunningCloudSync) -> None:
    name, selector, ids = family(cloud_sync)
    key = f"var={selector['var']}"
    before = cloud_sync.api.get(f"/v1/devices/{ids[0]}/state").json()["desired"]
    for force in (None, False):
        body = {"model": name, "version": 3, "selector": selector, **({} if force is None else {"force": force})}
        response = cloud_sync.api.put("/v1/assignments", json=body)
        assert response.status_code == 422, response.text
        detail = response.json()["detail"]
        assert f"{name}:3 is a compressed variant (int8 of {name}:2)" in detail and "force" in detail, detail
    assert assigned(cloud_sync, name) == [(2, key)]
    assert cloud_sync.api.get(f"/v1/devices/{ids[0]}/state").json()["desired"] == before
    records = [r for r in audit(cloud_sync, action="assignment.set") if r["target"] == f"assignment/{name}/{key}"]
    assert [r["after"]["version"] for r in records] == [2]  # the family's own assignment only

    message = failed(fleetctl(cloud_sync, "models", "assign", name, "3", "--selector", key), 2)
    assert "compressed variant" in message and "--force" in message, message
    assert assigned(cloud_sync, name) == [(2, key)]


def test_force_assigns_a_variant_and_the_audit_log_says_so(cloud_sync: RunningCloudSync) -> None:
    name, selector, _ = family(cloud_sync)
    key = f"var={selector['var']}"
    printed = ok(fleetctl(cloud_sync, "models", "assign", name, "3", "--selector", key, "--force"))
    assert f"{name}:3 assigned to {key} (priority 0), forced" in printed, printed
    assert assigned(cloud_sync, name) == [(3, key)]
    (newest, *_) = [r for r in audit(cloud_sync, action="assignment.set") if r["target"] == f"assignment/{name}/{key}"]
    assert newest["after"]["version"] == 3 and newest["after"]["forced"] is True, newest
    assert newest["after"]["variant"]["parent_version"] == 2, newest


def test_a_plain_version_needs_no_force(cloud_sync: RunningCloudSync) -> None:
    name, selector, _ = family(cloud_sync)
    response = cloud_sync.api.put("/v1/assignments", json={"model": name, "version": 1, "selector": selector})
    assert response.status_code == 200, response.text
    assert assigned(cloud_sync, name) == [(1, f"var={selector['var']}")]
