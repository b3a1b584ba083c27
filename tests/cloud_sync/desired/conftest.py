"""Fixtures for the desired-state plane: a real store (SQLite or PostgreSQL) with its stores side by side."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from cloud_sync.store import Database, DeviceRegistry, open_database
from cloud_sync.store.assignments import AssignmentStore
from cloud_sync.store.control import ControlStore


class Catalog:
    """The registry's digests as plain data: the one method the reconciler reads (ModelCatalog)."""

    def __init__(self, versions: dict[tuple[str, int], str] | None = None) -> None:
        self.versions = dict(versions or {})

    def digests(self) -> dict[tuple[str, int], str]:
        return dict(self.versions)


@pytest.fixture
def db(store_url: str) -> Iterator[Database]:
    database = open_database(store_url)
    try:
        yield database
    finally:
        database.close()


@pytest.fixture
def devices(db: Database) -> DeviceRegistry:
    return DeviceRegistry(db)


@pytest.fixture
def assignments(db: Database) -> AssignmentStore:
    return AssignmentStore(db)


@pytest.fixture
def control(db: Database) -> ControlStore:
    return ControlStore(db)
