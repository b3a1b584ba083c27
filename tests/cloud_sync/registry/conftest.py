"""A real cloud-sync in this process (its registry, control store and ports) for the registry's edges."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from cloud_sync.admin_token import admin_token
from cloud_sync.config import RegistrySection
from cloud_sync.registry import ModelRegistry
from tests.cloud_inprocess import InProcessCloud
from tests.waiting import wait_for

# Small, so that a test can send a blob past it cheaply (and still past the API's 1 MiB body limit).
MAX_BLOB_BYTES = 3 * 1024 * 1024


@pytest.fixture
def cloud(tmp_path: Path) -> Iterator[InProcessCloud]:
    running = InProcessCloud(tmp_path / "cloud")
    running.config = running.config.model_copy(update={"registry": RegistrySection(max_blob_bytes=MAX_BLOB_BYTES)})
    running.start()
    try:
        yield running
    finally:
        running.close()
    assert running.blocked == [], running.blocked


@pytest.fixture
def registry(cloud: InProcessCloud) -> ModelRegistry:
    assert cloud.app is not None and cloud.app.model_registry is not None
    return cloud.app.model_registry


@pytest.fixture
def api(cloud: InProcessCloud) -> Iterator[httpx.Client]:
    token = admin_token(cloud.config.data_dir)
    with httpx.Client(
        base_url=cloud.http_url, headers={"Authorization": f"Bearer {token}"}, timeout=30, trust_env=False
    ) as client:
        yield client


def assign(cloud: InProcessCloud, device_id: str, *refs: tuple[str, int]) -> None:
    """Assign each (name, version) to every device (the empty selector), and wait until `device_id`'s desired
    state names exactly them (the reconciler writes it); no refs: unassign what was assigned."""
    app = cloud.app
    assert app is not None and app.assignment_store is not None and app.reconciler is not None
    for existing in app.assignment_store.list():
        app.assignment_store.unassign(existing.name, existing.selector)
    for name, version in refs:
        app.assignment_store.assign(name, version, {})
    app.reconciler.reconcile()

    def named() -> bool:
        state = cloud.control.desired(device_id)
        return state is not None and {(m.name, m.version) for m in state.models} == set(refs)

    wait_for(named, 10, f"{device_id}'s desired state to name {refs}")
