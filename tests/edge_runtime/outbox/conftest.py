"""Fixtures for the outbox's tests: a real outbox file per test, records of a chosen size and priority."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from edge_runtime.outbox import Outbox, OutboxRecord
from edgefleet.proto.edgefleet.v1 import results_pb2

MakeRecord = Callable[..., OutboxRecord]
OpenOutbox = Callable[..., Outbox]


@pytest.fixture
def outbox_path(tmp_path: Path) -> Path:
    return tmp_path / "outbox.db"


@pytest.fixture
def make_record() -> MakeRecord:
    """make_record(i, size=200, priority=1, created_at_ms=now, payload=...) -> OutboxRecord; payloads tell i."""

    def make(
        i: int = 0,
        *,
        size: int = 200,
        priority: int = 1,
        created_at_ms: int | None = None,
        payload: Any = None,
        model: str = "digits",
    ) -> OutboxRecord:
        if payload is None:
            payload = payload_of(i, size)
        return OutboxRecord(
            created_at_ms=time.time_ns() // 1_000_000 if created_at_ms is None else created_at_ms,
            model=model,
            version=1,
            priority=priority,
            kind=results_pb2.RECORD_KIND_RESULT,
            payload_type="inference.ModelInferResponse",
            payload=payload,
            request_id=f"req-{i}",
        )

    return make


def payload_of(i: int, size: int) -> bytes:
    stamp = f"{i}:".encode()
    return (stamp * (size // len(stamp) + 1))[:size]


@pytest.fixture
def open_outbox(outbox_path: Path) -> Iterator[OpenOutbox]:
    """open_outbox(**options) -> Outbox at outbox_path (no age limit, no gathering delay); closed afterwards."""
    opened: list[Outbox] = []

    def open_(path: Path | None = None, **options: Any) -> Outbox:
        settings: dict[str, Any] = {"max_bytes": 1 << 40, "max_age_s": 0, "commit_interval_s": 0}
        settings.update(options)
        outbox = Outbox.open(path or outbox_path, **settings)
        opened.append(outbox)
        return outbox

    yield open_
    for outbox in opened:
        outbox.close(timeout=10)


def rows(path: Path, sql: str = "SELECT seq, payload, size FROM records ORDER BY seq", *args: Any) -> list[Any]:
    """Query the file through a fresh connection (what another process, or the next boot, would see)."""
    conn = sqlite3.connect(path)
    try:
        return conn.execute(sql, args).fetchall()
    finally:
        conn.close()
