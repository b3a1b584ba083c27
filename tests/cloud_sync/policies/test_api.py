"""The policy routes of a real `cloud-sync run`: set, list, show, delete, a device's effective policy, and every
bad input answered 422 (naming the field), 401 or 404 with nothing changed."""

from __future__ import annotations

import itertools
import json
from typing import Any

import httpx
import pytest

from tests.cloud_sync.conftest import RunningCloudSync

_names = itertools.count(1)


def new_name(prefix: str = "pol") -> str:
    return f"{prefix}-{next(_names)}"


def put(cloud_sync: RunningCloudSync, name: str, body: dict[str, Any]) -> httpx.Response:
    # json.dumps escapes to ASCII: a lone surrogate (valid JSON, not UTF-8) reaches the server as sent.
    content = json.dumps(body).encode()
    return cloud_sync.api.put(f"/v1/policies/{name}", content=content, headers={"content-type": "application/json"})


def test_put_get_list_delete(cloud_sync: RunningCloudSync) -> None:
    name = new_name()
    body = {"selector": {"site": "api-lab"}, "priority": 10, "document": {"inference": {"max_batch_size": 8}}}
    created = put(cloud_sync, name, body)
    assert created.status_code == 200, created.text
    shown = created.json()
    assert shown["name"] == name and shown["version"] == 1 and shown["selector"] == {"site": "api-lab"}
    assert shown["priority"] == 10 and shown["document"] == {"inference": {"max_batch_size": 8}}

    changed = put(cloud_sync, name, {**body, "document": {"inference": {"max_batch_size": 4}}})
    assert changed.status_code == 200 and changed.json()["version"] == 2
    assert cloud_sync.api.get(f"/v1/policies/{name}").json() == changed.json()
    assert name in [p["name"] for p in cloud_sync.api.get("/v1/policies").json()["policies"]]

    deleted = cloud_sync.api.delete(f"/v1/policies/{name}")
    assert deleted.status_code == 200 and deleted.json()["version"] == 2
    assert cloud_sync.api.get(f"/v1/policies/{name}").status_code == 404
    assert cloud_sync.api.delete(f"/v1/policies/{name}").status_code == 404


def test_effective_policy_of_a_device(cloud_sync: RunningCloudSync) -> None:
    site = new_name("site")
    device_id, _ = cloud_sync.new_device("eff", {"site": site, "cam": "front"})
    low, high = new_name("low"), new_name("high")
    assert (
        put(
            cloud_sync,
            low,
            {
                "selector": {"site": site},
                "priority": 1,
                "document": {"inference": {"max_batch_size": 16, "instances": 2}},
            },
        ).status_code
        == 200
    )
    assert (
        put(
            cloud_sync,
            high,
            {
                "selector": {"site": site, "cam": "front"},
                "priority": 5,
                "document": {"inference": {"max_batch_size": 4}},
            },
        ).status_code
        == 200
    )

    effective = cloud_sync.api.get(f"/v1/devices/{device_id}/effective-policy").json()
    assert effective["device_id"] == device_id
    assert effective["policy"] == {"inference": {"max_batch_size": 4, "instances": 2}}
    assert effective["sources"] == [low, high]
    assert len(effective["policy_hash"]) == 16

    assert cloud_sync.api.delete(f"/v1/policies/{high}").status_code == 200
    after = cloud_sync.api.get(f"/v1/devices/{device_id}/effective-policy").json()
    assert after["policy"] == {"inference": {"max_batch_size": 16, "instances": 2}} and after["sources"] == [low]
    assert after["policy_hash"] != effective["policy_hash"]
    cloud_sync.api.delete(f"/v1/policies/{low}")
    assert cloud_sync.api.get("/v1/devices/no-such-device/effective-policy").status_code == 404


@pytest.mark.parametrize(
    ("body", "says"),
    [
        ({"document": {"inference": {"max_batch_size": "8"}}}, "document.inference.max_batch_size: must be int"),
        ({"document": {"inference": {"max_batch_size": 0}}}, "document.inference.max_batch_size: 0 is out of range"),
        ({"document": {"inference": {"bogus": 1}}}, "document.inference.bogus: unknown key"),
        ({"document": {"engine": {"backend": "auto"}}}, "document.engine: unknown policy section"),
        ({"document": []}, "document: must be an object"),
        ({"document": {}, "priority": "high"}, "priority: must be an integer"),
        ({"document": {}, "priority": -5}, "priority: must be an integer"),
        ({"document": {}, "selector": "site=lab"}, "selector: a selector is an object"),
        ({"document": {}, "selector": {"bad key": "x"}}, "selector: selector key"),
        ({"document": {}, "selector": {"site": "\ud800"}}, "selector: "),
    ],
)
def test_bad_input_is_422_naming_the_field_and_changes_nothing(
    cloud_sync: RunningCloudSync, body: dict[str, Any], says: str
) -> None:
    name = new_name()
    response = put(cloud_sync, name, body)
    assert response.status_code == 422, response.text
    assert response.json()["detail"].startswith(says), response.json()
    assert cloud_sync.api.get(f"/v1/policies/{name}").status_code == 404


def test_a_malformed_body_or_name_is_refused(cloud_sync: RunningCloudSync) -> None:
    name = new_name()
    for body in ({}, {"document": {}, "extra": 1}):
        assert put(cloud_sync, name, body).status_code == 422
    response = cloud_sync.api.put(
        f"/v1/policies/{name}", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert response.status_code == 422
    bad_name = put(cloud_sync, "Bad_Name", {"document": {}})
    assert bad_name.status_code == 422 and bad_name.json()["detail"].startswith("name: ")
    assert cloud_sync.api.get(f"/v1/policies/{name}").status_code == 404


def test_a_policy_that_would_clash_with_another_on_some_device_is_refused(cloud_sync: RunningCloudSync) -> None:
    site = new_name("clash")
    cloud_sync.new_device("clash", {"site": site})
    levels = new_name("levels")
    assert (
        put(
            cloud_sync,
            levels,
            {
                "selector": {"site": site},
                "priority": 1,
                "document": {"inference": {"priority_levels": 4, "default_priority": 4}},
            },
        ).status_code
        == 200
    )
    fewer = new_name("fewer")
    refused = put(
        cloud_sync,
        fewer,
        {"selector": {"site": site}, "priority": 2, "document": {"inference": {"priority_levels": 2}}},
    )
    assert refused.status_code == 422
    assert "would get an invalid policy" in refused.json()["detail"] and levels in refused.json()["detail"]
    assert cloud_sync.api.get(f"/v1/policies/{fewer}").status_code == 404
    cloud_sync.api.delete(f"/v1/policies/{levels}")


def test_every_route_needs_the_admin_token(cloud_sync: RunningCloudSync) -> None:
    with httpx.Client(base_url=cloud_sync.http_url, trust_env=False, timeout=10) as anonymous:
        for method, path in [
            ("GET", "/v1/policies"),
            ("GET", "/v1/policies/x"),
            ("PUT", "/v1/policies/x"),
            ("DELETE", "/v1/policies/x"),
            ("GET", "/v1/devices/x/effective-policy"),
        ]:
            response = anonymous.request(method, path, json={"document": {}}, headers={"Authorization": "Bearer no"})
            assert response.status_code == 401, (method, path, response.text)
    assert cloud_sync.api.get("/v1/policies/x").status_code == 404
