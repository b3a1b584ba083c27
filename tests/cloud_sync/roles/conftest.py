"""Helpers for tests of roles and the audit log against the session's real cloud-sync."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Any

import httpx

from tests.cloud_sync.conftest import RunningCloudSync

_numbers = itertools.count(1)


def new_token(cloud: RunningCloudSync, role: str, prefix: str = "t") -> tuple[str, str]:
    """A token of `role` made through the API with a name no other test uses; (name, token)."""
    name = f"{prefix}-{role}-{next(_numbers)}"
    made = cloud.api.post("/v1/tokens", json={"name": name, "role": role})
    assert made.status_code == 201, made.text
    return name, made.json()["token"]


def client(cloud: RunningCloudSync, token: str) -> httpx.Client:
    return httpx.Client(
        base_url=cloud.http_url, headers={"Authorization": f"Bearer {token}"}, timeout=30, trust_env=False
    )


def audit(cloud: RunningCloudSync, **query: Any) -> list[dict[str, Any]]:
    """The audit records matching `query`, newest first."""
    response = cloud.api.get("/v1/audit", params={"limit": 1000, **query})
    assert response.status_code == 200, response.text
    records: list[dict[str, Any]] = response.json()["records"]
    return records


def mutating_routes(cloud: RunningCloudSync) -> Iterator[tuple[str, str]]:
    """(METHOD, path) of every route of the running app that may change something (its own schema)."""
    schema = cloud.api.get("/openapi.json").json()
    for path, item in schema["paths"].items():
        for method in item:
            if method.upper() not in ("GET", "HEAD"):
                yield method.upper(), path


def read_routes(cloud: RunningCloudSync) -> Iterator[str]:
    schema = cloud.api.get("/openapi.json").json()
    return (path for path, item in schema["paths"].items() if "get" in item)


def concrete(path: str) -> str:
    """`path` with each parameter filled with a well-formed value that names nothing stored."""
    values = {
        "sha256": "0" * 64,
        "name": "nothing-here",
        "version": "999",
        "device_id": "no-such-device",
        "rollout_id": "ro-0000000000",
    }
    for key, value in values.items():
        path = path.replace(f"{{{key}}}", value)
    assert "{" not in path, f"a path parameter the test does not know: {path}"
    return path


def call(http: httpx.Client, method: str, path: str) -> httpx.Response:
    if path.startswith("/v1/blobs/"):
        return http.request(method, concrete(path), content=b"x")
    return http.request(method, concrete(path), json={})
