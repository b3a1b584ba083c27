"""Fixtures for fault tests: a cloud-sync, and devices wired to it (see fleet.py)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.faults.fleet import Cloud, Device


@pytest.fixture
def cloud(tmp_path: Path) -> Iterator[Cloud]:
    started = Cloud(tmp_path / "cloud")
    started.start()
    yield started
    started.kill()


@pytest.fixture
def make_device(
    tmp_path: Path, short_dir: Path, model_packages: dict[str, Path], cloud: Cloud
) -> Iterator[Callable[..., Device]]:
    devices: list[Device] = []

    def make(device_id: str = "cam-1", **options: Any) -> Device:
        token = cloud.add_device(device_id)
        device = Device(tmp_path / device_id, short_dir, device_id, cloud, token, model_packages["digits:1"], **options)
        devices.append(device)
        return device

    yield make
    for device in devices:
        device.kill()
