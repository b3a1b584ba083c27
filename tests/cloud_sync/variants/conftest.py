"""Fixtures for the variant tests: the session's real cloud-sync, its database, and versions pushed with lineage.

A variant here is a registry entry like any (fake ONNX bytes, as tests/cloud_sync/desired pushes them) whose
manifest carries `lineage`: what the cloud reads to tell a variant. Real compression is tests/fleet/test_variants.py.
"""

from __future__ import annotations

import hashlib
import itertools
from typing import Any

from tests.cloud_sync.conftest import RunningCloudSync
from tests.cloud_sync.rollouts_api.conftest import cloud_db

__all__ = ["cloud_db", "family", "push_version"]

_numbers = itertools.count(1)
METHODS = {"int8-static": "int8", "int8-dynamic": "int8", "fp16": "fp16"}


def push_version(
    cloud: RunningCloudSync, name: str, version: int, parent: int | None = None, method: str = "int8-static"
) -> dict[str, Any]:
    """Register `name:version` through the admin API (fake bytes, `version` * 100 of them); a variant of
    `name:parent` made by `method` when `parent` is given. The registered version."""
    body = f"{name}:{version} ".encode() * (version * 10)
    sha = hashlib.sha256(body).hexdigest()
    put = cloud.api.put(f"/v1/blobs/{sha}", content=body)
    assert put.status_code in (200, 201), put.text
    manifest: dict[str, Any] = {
        "name": name,
        "version": version,
        "platform": "onnx",
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 4]}],
        "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1, 2]}],
        "sha256": sha,
        "size": len(body),
    }
    if parent is not None:
        manifest["lineage"] = {
            "parent": {"name": name, "version": parent, "sha256": "ab" * 32},
            "method": method,
            "precision": METHODS[method],
            "tool": "test",
        }
    created = cloud.api.post("/v1/models", json={"manifest": manifest})
    assert created.status_code in (200, 201), created.text
    found: dict[str, Any] = created.json()
    return found


def family(
    cloud: RunningCloudSync, devices: int = 3, tokens: dict[str, str] | None = None
) -> tuple[str, dict[str, str], list[str]]:
    """A model of its own: v1, v2, v3 = int8 variant of v2, v4 = fp16 variant of v3 (a variant of a variant);
    v2 assigned to `devices` devices of a label of their own. (name, selector, device ids); each device's
    token into `tokens` when given."""
    group = f"var{next(_numbers)}"
    name = f"digits-{group}"
    for version, parent, method in ((1, None, ""), (2, None, ""), (3, 2, "int8-static"), (4, 3, "fp16")):
        push_version(cloud, name, version, parent, method or "int8-static")
    made = dict(cloud.new_device(labels={"var": group}) for _ in range(devices))
    if tokens is not None:
        tokens.update(made)
    ids = list(made)
    selector = {"var": group}
    put = cloud.api.put("/v1/assignments", json={"model": name, "version": 2, "selector": selector})
    assert put.status_code == 200, put.text
    return name, selector, ids
