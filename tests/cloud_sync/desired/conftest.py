"""Fixtures for the desired-state plane: a real store (SQLite or PostgreSQL) with its stores side by side."""

from __future__ import annotations


class Catalog:
    """The registry's digests as plain data: the one method the reconciler reads (ModelCatalog)."""

    def __init__(self, versions: dict[tuple[str, int], str] | None = None) -> None:
        self.versions = dict(versions or {})

    def digests(self) -> dict[tuple[str, int], str]:
        return dict(self.versions)
