"""Rollouts of a compressed variant on a real cloud-sync: refused (422, nothing changed) unless shadowed first under
the agreement gate; accepted with its lineage recorded, whatever version the devices run; plain versions as before.

Bake times of an hour keep the controller from moving these rollouts by itself.
"""

from __future__ import annotations

from typing import Any

import pytest

from cloud_sync.errors import InvalidArgument
from cloud_sync.rollouts.plan import Gates, Stage, Variant, check_variant_plan, parse_gates, parse_stages, variant_of
from tests.cloud_sync.conftest import RunningCloudSync
from tests.cloud_sync.roles.conftest import audit
from tests.cloud_sync.test_fleetctl import failed, fleetctl, ok
from tests.cloud_sync.variants.conftest import family

PROVEN = "shadow:100%:1h,active:50%:1h,active:100%"
GATES = "max_error_rate=0.01,min_shadow_agreement=0.95,min_devices=1"


def post(cloud: RunningCloudSync, name: str, selector: dict[str, str], to: int, **overrides: Any) -> Any:
    body = {"model": name, "to_version": to, "selector": selector, "stages": PROVEN, "gates": GATES, **overrides}
    return cloud.api.post("/v1/rollouts", json=body)


def nothing_changed(cloud: RunningCloudSync, name: str, ids: list[str]) -> None:
    """No rollout of `name` exists, no rollout was audited for it, and every device still wants v2 alone."""
    rollouts = cloud.api.get("/v1/rollouts").json()["rollouts"]
    assert [r for r in rollouts if r["model"] == name] == []
    assert [r for r in audit(cloud, action="rollout.create") if name in r["reason"]] == []
    for device_id in ids:
        desired = cloud.api.get(f"/v1/devices/{device_id}/state").json()["desired"]
        assert [(m["name"], m["version"], m["role"]) for m in desired["models"]] == [(name, 2, "MODEL_ROLE_ACTIVE")], (
            desired
        )


# -- the pure rule ------------------------------------------------------------------------------------------------


def test_variant_of_reads_a_lineage_leniently() -> None:
    lineage = {"parent": {"name": "d", "version": 2, "sha256": "ab" * 32}, "method": "fp16", "precision": "fp16"}
    assert variant_of({"name": "d"}) is None
    assert variant_of({"lineage": lineage}) == Variant(2, "fp16", "fp16")
    # A malformed lineage the registry kept still marks a variant: it is proven first like any.
    assert variant_of({"lineage": "int8"}) == Variant(None, "", "")
    assert variant_of({"lineage": {"parent": {"version": True}}}) == Variant(None, "", "")
    assert Variant(None, "", "").describe("d") == "compressed of an unknown parent"


@pytest.mark.parametrize(
    ("stages", "gates", "problem"),
    [
        ("active:10%,active:100%", "min_shadow_agreement=0.9", "needs a shadow stage first"),
        ("active:100%", "min_shadow_agreement=0.9", "needs a shadow stage first"),
        ("shadow:10%,active:100%", "max_error_rate=0.01", "min_shadow_agreement"),
    ],
)
def test_check_variant_plan_refuses_an_unproven_plan(stages: str, gates: str, problem: str) -> None:
    with pytest.raises(InvalidArgument, match=problem):
        check_variant_plan("d", 3, Variant(2, "int8-static", "int8"), parse_stages(stages), parse_gates(gates))
    check_variant_plan(
        "d",
        3,
        Variant(2, "int8-static", "int8"),
        [Stage("shadow", 5), Stage("active", 100)],
        Gates(min_shadow_agreement=0.9),
    )


# -- the API ------------------------------------------------------------------------------------------------------


def test_a_variant_without_a_shadow_stage_is_refused_with_the_fix_and_nothing_changes(
    cloud_sync: RunningCloudSync,
) -> None:
    name, selector, ids = family(cloud_sync)
    for stages in ("active:10%:1h,active:100%", "active:100%", [{"mode": "active", "percent": 100}]):
        response = post(cloud_sync, name, selector, 3, stages=stages)
        assert response.status_code == 422, response.text
        detail = response.json()["detail"]
        assert f"{name}:3 is a compressed variant (int8 of {name}:2)" in detail, detail
        assert "needs a shadow stage first" in detail and "shadow:100%:10m,active:10%:10m,active:100%" in detail
    nothing_changed(cloud_sync, name, ids)


def test_a_variant_shadowed_without_the_agreement_gate_is_refused(cloud_sync: RunningCloudSync) -> None:
    name, selector, ids = family(cloud_sync)
    for gates in ("max_error_rate=0.01", None, "min_shadow_agreement=off"):
        response = post(cloud_sync, name, selector, 3, gates=gates)
        assert response.status_code == 422, response.text
        assert "min_shadow_agreement" in response.json()["detail"], response.text
    nothing_changed(cloud_sync, name, ids)


def test_a_proven_plan_starts_and_records_the_lineage(cloud_sync: RunningCloudSync) -> None:
    name, selector, ids = family(cloud_sync)
    response = post(cloud_sync, name, selector, 3)
    assert response.status_code == 201, response.text
    created = response.json()
    assert (created["from_version"], created["to_version"], created["state"]) == (2, 3, "running")
    events = cloud_sync.api.get(f"/v1/rollouts/{created['id']}/events").json()["events"]
    variant = {"parent_version": 2, "method": "int8-static", "precision": "int8", "from_is_parent": True}
    assert events[0]["kind"] == "created" and events[0]["values"]["variant"] == variant, events
    (record,) = audit(cloud_sync, target=f"rollout/{created['id']}")
    assert record["after"]["variant"] == variant, record
    # The shadow stage: every device runs v2 ACTIVE and the variant SHADOW beside it.
    desired = cloud_sync.api.get(f"/v1/devices/{ids[0]}/state").json()["desired"]
    assert sorted((m["version"], m["role"]) for m in desired["models"]) == [
        (2, "MODEL_ROLE_ACTIVE"),
        (3, "MODEL_ROLE_SHADOW"),
    ]


def test_a_variant_of_a_variant_rolls_out_over_what_the_devices_run(cloud_sync: RunningCloudSync) -> None:
    """v4 is an fp16 variant of v3 (itself a variant of v2), the devices run v2: allowed, proven like any variant
    (the gates judge B against the devices' A), and the record says A is not its parent."""
    name, selector, _ = family(cloud_sync)
    refused = post(cloud_sync, name, selector, 4, stages="active:100%")
    assert refused.status_code == 422 and f"(fp16 of {name}:3)" in refused.json()["detail"], refused.text
    response = post(cloud_sync, name, selector, 4)
    assert response.status_code == 201, response.text
    events = cloud_sync.api.get(f"/v1/rollouts/{response.json()['id']}/events").json()["events"]
    assert events[0]["values"]["variant"] == {
        "parent_version": 3,
        "method": "fp16",
        "precision": "fp16",
        "from_is_parent": False,
    }


def test_a_plain_version_still_rolls_out_active_first(cloud_sync: RunningCloudSync) -> None:
    name, selector, _ = family(cloud_sync)
    cloud_sync.api.put("/v1/assignments", json={"model": name, "version": 1, "selector": selector})
    response = post(cloud_sync, name, selector, 2, stages="active:50%:1h,active:100%", gates="max_error_rate=0.01")
    assert response.status_code == 201, response.text
    events = cloud_sync.api.get(f"/v1/rollouts/{response.json()['id']}/events").json()["events"]
    assert "variant" not in events[0]["values"]


def test_fleetctl_rollouts_create_of_an_unproven_variant_exits_2_with_the_fix(cloud_sync: RunningCloudSync) -> None:
    name, selector, ids = family(cloud_sync)
    ((key, value),) = selector.items()
    create = ["rollouts", "create", "--model", name, "--to", "3", "--selector", f"{key}={value}", "--gates", GATES]
    message = failed(fleetctl(cloud_sync, *create, "--stages", "active:100%"), 2)
    assert "compressed variant" in message and "shadow:100%:10m" in message, message
    nothing_changed(cloud_sync, name, ids)
    created = ok(fleetctl(cloud_sync, *create, "--stages", PROVEN))
    assert f"{name} 2 -> 3" in created, created
