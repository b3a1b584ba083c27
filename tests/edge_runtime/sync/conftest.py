"""Fixtures for the device's MQTT link: a real Mosquitto per test, an asyncio loop (debug mode) on a thread."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.loopcheck import LoopThread
from tests.mosquitto import Mosquitto


@pytest.fixture
def loop() -> Iterator[LoopThread]:
    thread = LoopThread("test-agent-loop")
    yield thread
    thread.close()
    assert not thread.blocking(), f"callbacks blocked the loop: {thread.blocking()}"


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Mosquitto]:
    """A fresh broker with persistence (so sessions and retained messages survive its restart)."""
    with Mosquitto(tmp_path / "broker", persistence=True) as running:
        yield running
