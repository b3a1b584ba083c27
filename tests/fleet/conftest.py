"""The fleets of tests/fleet: one per transport (MQTT through Mosquitto, or the gRPC Control stream), shared by
a module's numbered checks, which build on each other's state in order (a failed check skips the rest)."""

from __future__ import annotations

import shutil
from collections.abc import Generator, Iterator
from pathlib import Path

import pytest

from tests.fleet.harness import DYNSEC_PLUGIN, Fleet, remove, short_socket_dir, start_fleet
from tests.mosquitto import MOSQUITTO

# Five devices: four in the lab (the selector site=lab picks them), one in the field.
LABELS = {
    "cam-1": {"site": "lab", "cam": "1"},
    "cam-2": {"site": "lab", "cam": "2"},
    "cam-3": {"site": "lab", "cam": "3"},
    "cam-4": {"site": "lab", "cam": "4"},
    "cam-5": {"site": "field", "cam": "5"},
}


def _broker_missing() -> str:
    if not Path(MOSQUITTO).exists():
        return "mosquitto is not installed"
    if not Path(DYNSEC_PLUGIN).exists() or shutil.which("mosquitto_ctrl") is None:
        return "Mosquitto's dynamic security plugin (and mosquitto_ctrl) is not installed"
    return ""


@pytest.fixture(scope="module", params=["mqtt", "grpc"])
def fleet(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, model_packages: dict[str, Path]
) -> Iterator[Fleet]:
    transport = request.param
    if transport == "mqtt" and (missing := _broker_missing()):
        pytest.skip(missing)
    sockets = short_socket_dir()
    started = start_fleet(tmp_path_factory.mktemp(f"fleet-{transport}"), sockets, transport, LABELS, model_packages)
    try:
        yield started
    finally:
        started.close()
        remove(sockets)


@pytest.fixture(autouse=True)
def _in_order(request: pytest.FixtureRequest) -> None:
    """Skip a check whose fleet lost an earlier check: its starting state is not there."""
    if "fleet" not in request.fixturenames:
        return
    fleet: Fleet = request.getfixturevalue("fleet")
    if fleet.broken:
        pytest.skip(f"{fleet.broken} failed on this fleet; this check builds on its state")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    fleet = getattr(item, "funcargs", {}).get("fleet")
    if isinstance(fleet, Fleet) and report.failed and not fleet.broken:
        fleet.broken = item.name
    return report
